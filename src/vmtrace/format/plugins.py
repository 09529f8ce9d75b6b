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

Each factory gets the event's format, the compiled default renderer and a context
(symbol lookup, comm registration) and returns ``payload -> text``, or None when the
event does not have the fields the plugin expects (then the default text is used,
as libtraceevent does when a plugin's field lookup fails).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Protocol

from vmtrace.format.printfmt import M64, compile_reader

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
        if st & ((1 << len(states)) - 1):
            s = "|".join(states[i] for i in range(len(states)) if st >> i & 1)
        else:
            s = "R"
        return "%s:%d [%d] %s ==> %s:%d [%d]" % (pc, pp, _i32(ppr), s, nc, np_, _i32(npr))
    return render


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
        addr = read(p)[0] & M64
        hit = symbol(addr)
        if hit is None:
            return default(p)
        return "(%s+0x%x) %s" % (hit[0], (addr - hit[1]) & 0xFFFFFFFF, default(p))
    return render


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
        r = _TLB_REASONS.get(reason)
        return "pages=%d reason=%s (%d)" % (pages, r or "", reason)
    return render


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

PLUGINS: dict[tuple[str, str], Callable[[Any, Render, PluginContext], Optional[Render]]] = {
    ("sched", "sched_switch"): sched_switch,
    ("sched", "sched_wakeup"): sched_wakeup,
    ("sched", "sched_wakeup_new"): sched_wakeup,
    ("kmem", "kfree"): kmem_call_site,
    ("kmem", "kmalloc"): kmem_call_site,
    ("kmem", "kmalloc_node"): kmem_call_site,
    ("kmem", "kmem_cache_alloc"): kmem_call_site,
    ("kmem", "kmem_cache_alloc_node"): kmem_call_site,
    ("kmem", "kmem_cache_free"): kmem_call_site,
    ("timer", "hrtimer_expire_entry"): hrtimer_expire_entry,
    ("timer", "hrtimer_start"): hrtimer_start,
    ("tlb", "tlb_flush"): tlb_flush,
    ("syscalls", "sys_enter_futex"): sys_enter_futex,
}


def plugin_for(fmt: Any, default: Render, ctx: PluginContext) -> Optional[Render]:
    """The plugin renderer for ``fmt``'s event, or None to use the print fmt as is."""
    factory = PLUGINS.get((fmt.system, fmt.name))
    return factory(fmt, default, ctx) if factory else None
