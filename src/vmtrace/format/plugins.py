"""The event printers trace-cmd's plugins substitute for some kernels' print fmts.

``trace-cmd report`` loads libtraceevent plugins that replace (or prefix) the text of a
few common events. Output identical to trace-cmd therefore needs the same overrides;
these were found by comparing trace-cmd's output with the plain print fmt on real traces:

- sched_switch, sched_wakeup, sched_wakeup_new: ``comm:pid [prio] S ==> comm:pid [prio]``
  (and they teach the comm table the names they carry, as the plugin does);
- kmalloc, kmalloc_node, kfree, kmem_cache_alloc(_node), kmem_cache_free: a
  ``(symbol+0xoff) `` prefix before the normal text;
- hrtimer_start, hrtimer_expire_entry: ``function=sym/0x0`` style;
- tlb_flush, syscalls:sys_enter_futex.

Each plugin is declared once, in :data:`PLUGINS`, as a :class:`Plugin`: its per-event
form and, where it has one, its bulk form for :mod:`vmtrace.format.fastrender`. The
per-event form gets the event's format, the compiled default renderer and a context
(symbol lookup, comm registration) and returns ``payload -> text``, or None when the
event does not have the fields the plugin expects (then the default text is used, as
libtraceevent does when a plugin's field lookup fails); that answer also decides for
the bulk path. The bulk form is the same text as a Python %-format plus one argument
expression per conversion; a plugin without one is printed per event on the fast path
too, so declaring only the per-event form is never wrong, only slower.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Protocol

from vmtrace.format.printfmt import _HELPERS, M64, compile_reader

Render = Callable[[Any], str]


class PluginContext(Protocol):
    def symbol(self, addr: int) -> Optional[tuple]: ...          # (name, start) or None
    def register_comm(self, pid: int, comm: str) -> None: ...


def _reader(fmt: Any, names: list[str]) -> Optional[Callable[[Any], tuple]]:
    try:
        return compile_reader(fmt.fields, names, long_size=getattr(fmt, "long_size", 8),
                              endian=getattr(fmt, "endian", "<"))
    except KeyError:
        return None


def _has(fmt: Any, name: str) -> bool:
    return any(f.name == name for f in fmt.fields)


@dataclass(frozen=True)
class Bulk:
    """A plugin's text for many events at once: ``body % tuple(values of args)``.

    ``args`` are Python expressions over ``f_<field>`` variables, evaluated in
    ``namespace`` (printfmt's helpers plus the plugin's own), like a compiled print fmt's
    ``body_fmt``/``body_args``.
    """
    body: str
    args: tuple
    namespace: dict


def _bulk_namespace(ctx: PluginContext, base: Optional[dict] = None) -> dict:
    """The helpers bulk argument expressions call, bound to this trace's symbols."""
    symbol = ctx.symbol
    ns = dict(_HELPERS if base is None else base)
    ns.update(_kprefix=lambda v: _call_site_prefix(symbol, v),
              _funcf=lambda v: _func_field(symbol, v), _tlbr=_tlb_reason)
    return ns


# ---------------------------------------------------------------- sched

_DEFAULT_STATES = "SDTtZXxW"


def _state_letters(fmt: Any) -> str:
    """Letters for prev_state bits as trace-cmd 3.1.6 (libtraceevent 1.7) prints them.

    That version does not find the kernel's __print_flags table for prev_state on
    current kernels and falls back to its built-in "SDTtZXxW" (so TASK_DEAD prints W,
    EXIT_ZOMBIE X). We follow the oracle, not the kernel table.
    """
    return _DEFAULT_STATES


def sched_switch(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    read = _reader(fmt, ["prev_comm", "prev_pid", "prev_prio", "prev_state",
                         "next_comm", "next_pid", "next_prio"])
    if read is None:
        return None
    states = _state_letters(fmt)
    register = ctx.register_comm

    def render(p: Any) -> str:
        pc, pp, ppr, st, nc, np_, npr = read(p)
        register(pp, pc)
        register(np_, nc)
        return "%s:%d [%d] %s ==> %s:%d [%d]" % (pc, pp, _i32(ppr), _prev_state(st, states),
                                                 nc, np_, _i32(npr))
    return render


def _prev_state(st: int, states: str) -> str:
    if st & ((1 << len(states)) - 1):
        return "|".join(states[i] for i in range(len(states)) if st >> i & 1)
    return "R"


def sched_switch_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    ns = _bulk_namespace(ctx)
    states = _state_letters(fmt)
    ns["_state"] = lambda st: _prev_state(st, states)
    return Bulk("%s:%d [%d] %s ==> %s:%d [%d]",
                ("f_prev_comm", "f_prev_pid", "_s(f_prev_prio, 32)", "_state(f_prev_state)",
                 "f_next_comm", "f_next_pid", "_s(f_next_prio, 32)"), ns)


def sched_wakeup(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    read = _reader(fmt, ["comm", "pid"])
    if read is None:
        return None
    prio = _reader(fmt, ["prio"])
    success = _reader(fmt, ["success"])
    target = _reader(fmt, ["target_cpu"])
    register = ctx.register_comm

    def render(p: Any) -> str:
        comm, pid = read(p)
        register(pid, comm)
        out = "%s:%d" % (comm, pid)
        if prio:
            out += " [%d]" % prio(p)[0]
        if success:
            out += " success=%d" % success(p)[0]
        if target:
            out += " CPU:%03d" % (target(p)[0] & M64)
        return out
    return render


def sched_wakeup_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    body, args = "%s:%d", ["f_comm", "f_pid"]
    for name, text, arg in (("prio", " [%d]", "f_prio"), ("success", " success=%d", "f_success"),
                            ("target_cpu", " CPU:%03d", "(f_target_cpu & %d)" % M64)):
        if _has(fmt, name):
            body += text
            args.append(arg)
    return Bulk(body, tuple(args), _bulk_namespace(ctx))


def _i32(v: int) -> int:
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


# ---------------------------------------------------------------- kmem


def kmem_call_site(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    read = _reader(fmt, ["call_site"])
    if read is None:
        return None
    symbol = ctx.symbol

    def render(p: Any) -> str:
        return _call_site_prefix(symbol, read(p)[0]) + default(p)
    return render


def _call_site_prefix(symbol: Callable[[int], Optional[tuple]], val: int) -> str:
    addr = val & M64
    hit = symbol(addr)
    if hit is None:
        return ""
    return "(%s+0x%x) " % (hit[0], (addr - hit[1]) & 0xFFFFFFFF)


def kmem_call_site_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    if pf is None:      # the print fmt has no bulk form: neither has the prefixed text
        return None
    return Bulk("%s" + pf.body_fmt, ("_kprefix(f_call_site)",) + tuple(pf.body_args),
                _bulk_namespace(ctx, pf.namespace))


# ---------------------------------------------------------------- hrtimer


def _func_field(symbol: Callable[[int], Optional[tuple]], val: int) -> str:
    val &= M64
    hit = symbol(val)
    if hit is None:
        return "0x%08x" % val
    return "%s/0x%x" % (hit[0], (hit[1] - val) & M64)


def hrtimer_expire_entry(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    tname = "timer" if _has(fmt, "timer") else "hrtimer"
    read = _reader(fmt, [tname, "now", "function"])
    if read is None:
        return None
    symbol = ctx.symbol

    def render(p: Any) -> str:
        t, now, fn = read(p)
        return "hrtimer=0x%x now=%d function=%s" % (t & M64, now & M64, _func_field(symbol, fn))
    return render


def hrtimer_expire_entry_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    t = "timer" if _has(fmt, "timer") else "hrtimer"
    return Bulk("hrtimer=0x%x now=%d function=%s",
                ("(f_%s & %d)" % (t, M64), "(f_now & %d)" % M64, "_funcf(f_function)"),
                _bulk_namespace(ctx))


def hrtimer_start(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    tname = "timer" if _has(fmt, "timer") else "hrtimer"
    read = _reader(fmt, [tname, "function", "expires", "softexpires"])
    if read is None:
        return None
    symbol = ctx.symbol

    def render(p: Any) -> str:
        t, fn, exp, soft = read(p)
        return "hrtimer=0x%x function=%s expires=%d softexpires=%d" % (
            t & M64, _func_field(symbol, fn), exp & M64, soft & M64)
    return render


def hrtimer_start_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    t = "timer" if _has(fmt, "timer") else "hrtimer"
    return Bulk("hrtimer=0x%x function=%s expires=%d softexpires=%d",
                ("(f_%s & %d)" % (t, M64), "_funcf(f_function)", "(f_expires & %d)" % M64,
                 "(f_softexpires & %d)" % M64), _bulk_namespace(ctx))


# ---------------------------------------------------------------- tlb, futex

_TLB_REASONS = {0: "flush on task switch", 1: "remote shootdown", 2: "local shootdown",
                3: "local mm shootdown"}


def tlb_flush(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    read = _reader(fmt, ["pages", "reason"])
    if read is None:
        return None

    def render(p: Any) -> str:
        pages, reason = read(p)
        pages = pages & M64
        pages = pages - (1 << 64) if pages >> 63 else pages
        return "pages=%d reason=%s (%d)" % (pages, _tlb_reason(reason), reason)
    return render


def _tlb_reason(reason: int) -> str:
    return _TLB_REASONS.get(reason) or ""


def tlb_flush_bulk(fmt: Any, pf: Any, ctx: PluginContext) -> Optional[Bulk]:
    return Bulk("pages=%d reason=%s (%d)", ("_s(f_pages, 64)", "_tlbr(f_reason)", "f_reason"),
                _bulk_namespace(ctx))


_FUTEX_OPS = [
    ("FUTEX_WAIT", " val=0x%08x", " utime=0x%08x", None, None),
    ("FUTEX_WAKE", " val=%d", None, None, None),
    ("FUTEX_FD", " val=%d", None, None, None),
    ("FUTEX_REQUEUE", " val=%d", " val2=%d", " uaddr2=0x%08x", None),
    ("FUTEX_CMP_REQUEUE", " val=%d", " val2=%d", " uaddr2=0x%08x", " val3=0x%08x"),
    ("FUTEX_WAKE_OP", " val=%d", " val2=%d", " uaddr2=0x%08x", " val3=0x%08x"),
    ("FUTEX_LOCK_PI", None, " utime=0x%08x", None, None),
    ("FUTEX_UNLOCK_PI", None, None, None, None),
    ("FUTEX_TRYLOCK_PI", None, None, None, None),
    ("FUTEX_WAIT_BITSET", " val=0x%08x", " utime=0x%08x", None, " val3=0x%08x"),
    ("FUTEX_WAKE_BITSET", " val=%d", None, None, " val3=0x%08x"),
    ("FUTEX_WAIT_REQUEUE_PI", " val=0x%08x", " utime=0x%08x", " uaddr2=0x%08x", " val3=0x%08x"),
    ("FUTEX_CMP_REQUEUE_PI", " val=%d", " val2=%d", " uaddr2=0x%08x", " val3=0x%08x"),
]


def sys_enter_futex(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    read = _reader(fmt, ["uaddr", "op", "val", "utime", "uaddr2", "val3"])
    if read is None:
        return None

    def render(p: Any) -> str:
        uaddr, op, val, utime, uaddr2, val3 = (x & M64 for x in read(p))
        cmd = op & 127
        if cmd >= len(_FUTEX_OPS):
            return default(p)
        name, fv, fu, fa, f3 = _FUTEX_OPS[cmd]
        out = ["op=", name]
        if op & 128:
            out.append("|FUTEX_PRIVATE_FLAG")
        if op & 256:
            out.append("|FUTEX_CLOCK_REALTIME")
        out.append(" uaddr=0x%08x" % uaddr)
        for f, v in ((fv, val), (fu, utime), (fa, uaddr2), (f3, val3)):
            if f:
                out.append(f % v)
        return "".join(out)
    return render


# ---------------------------------------------------------------- registry

Factory = Callable[[Any, Render, PluginContext], Optional[Render]]
# (format, compiled print fmt or None, context) -> the bulk text, None: print per event
BulkFactory = Callable[[Any, Any, PluginContext], Optional[Bulk]]

_SWITCH_COMMS = (("prev_pid", "prev_comm"), ("next_pid", "next_comm"))
_WAKEUP_COMMS = (("pid", "comm"),)


@dataclass(frozen=True)
class Plugin:
    """One trace-cmd plugin override, in every form the renderers use.

    ``comms`` are the (pid field, comm field) pairs the plugin teaches the comm table:
    the per-event form registers them as it renders, the bulk renderer learns them
    ahead of formatting, so it needs them declared (tests check the two agree).
    """
    render: Factory
    bulk: Optional[BulkFactory] = None
    comms: tuple = ()


_KMEM = Plugin(kmem_call_site, kmem_call_site_bulk)

PLUGINS: dict[tuple[str, str], Plugin] = {
    ("sched", "sched_switch"): Plugin(sched_switch, sched_switch_bulk, _SWITCH_COMMS),
    ("sched", "sched_wakeup"): Plugin(sched_wakeup, sched_wakeup_bulk, _WAKEUP_COMMS),
    ("sched", "sched_wakeup_new"): Plugin(sched_wakeup, sched_wakeup_bulk, _WAKEUP_COMMS),
    ("kmem", "kfree"): _KMEM,
    ("kmem", "kmalloc"): _KMEM,
    ("kmem", "kmalloc_node"): _KMEM,
    ("kmem", "kmem_cache_alloc"): _KMEM,
    ("kmem", "kmem_cache_alloc_node"): _KMEM,
    ("kmem", "kmem_cache_free"): _KMEM,
    ("timer", "hrtimer_expire_entry"): Plugin(hrtimer_expire_entry, hrtimer_expire_entry_bulk),
    ("timer", "hrtimer_start"): Plugin(hrtimer_start, hrtimer_start_bulk),
    ("tlb", "tlb_flush"): Plugin(tlb_flush, tlb_flush_bulk),
    ("syscalls", "sys_enter_futex"): Plugin(sys_enter_futex),
}


def plugin_for(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    """The plugin renderer for ``fmt``'s event, or None to use the print fmt as is."""
    plugin = PLUGINS.get((fmt.system, fmt.name))
    return plugin.render(fmt, default, ctx) if plugin else None


def _never(p: Any) -> str:
    raise AssertionError("a plugin's default renderer was called while probing it")


def applicable_plugin(fmt: Any, ctx: PluginContext) -> Optional[Plugin]:
    """The plugin that prints ``fmt``'s events, or None when the print fmt does.

    Asked of the per-event form, so both renderers agree on when a plugin applies: its
    factory returns None when the event lacks a field it reads. The probe renders
    nothing, so the default it is given is never called.
    """
    plugin = PLUGINS.get((fmt.system, fmt.name))
    if plugin is None or plugin.render(fmt, _never, ctx) is None:
        return None
    return plugin
