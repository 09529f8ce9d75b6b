"""Text exactly like ``trace-cmd report``: header, columns, drop markers, buffer prefixes.

trace-cmd builds each line as ``%16s-%-5d [%03d] %5lu.%06lu: NAME: PADDING INFO`` where
the time is rounded to microseconds, NAME is padded so the info starts in the same
column for names up to 20 characters, and INFO is the event's print fmt (or a plugin's
text). A record that follows lost data is preceded, in the same output chunk, by
``CPU:N [K EVENTS DROPPED]``; for buffers other than the top one the chunk starts with
``NAME: `` - so the event line right after a drop marker carries no prefix.

Everything per event type (compiled print fmt, plugin, padded name) is prepared once
and cached by event id, so a line costs a few dictionary lookups and two ``%``
operations.
"""
from __future__ import annotations

import struct
from typing import Any, Callable, Dict, Iterable, Iterator, Optional

from vmtrace.format.plugins import plugin_for
from vmtrace.format.printfmt import M64, compile_print_fmt, field_info

_NAME_WIDTH = 20


def event_name_column(name: str) -> str:
    """``NAME: `` plus the padding trace-cmd adds so short names line up."""
    return "%s: %s" % (name, " " * max(0, _NAME_WIDTH - len(name)))


def time_column(ts: int) -> str:
    """Seconds with microseconds, rounded to nearest like libtraceevent."""
    us = (ts + 500) // 1000
    return "%5d.%06d" % divmod(us, 1000000)


def lost_text(cpu: int, count: int) -> str:
    if count is not None and count >= 0:
        return "CPU:%d [%d EVENTS DROPPED]" % (cpu, count)
    return "CPU:%d [EVENTS DROPPED]" % cpu


class _Ctx:
    """What plugins may use: symbol lookup and libtraceevent's comm registration."""

    def __init__(self, comms: Dict[int, str], kallsyms: Any):
        self._comms = comms
        self._ks = kallsyms
        self._cache: Dict[int, Optional[tuple]] = {}

    def address(self, name: str) -> Optional[int]:
        """A kernel symbol's address, for identifiers in print fmts that are not fields."""
        find = getattr(self._ks, "address", None)
        return find(name) if find is not None else None

    def symbol(self, addr: int) -> Optional[tuple]:
        hit = self._cache.get(addr, 0)
        if hit == 0:
            h = self._ks.lookup(addr) if self._ks is not None else None
            hit = (h[0], addr - h[1]) if h else None
            if len(self._cache) < 1 << 16:
                self._cache[addr] = hit
        return hit

    def register_comm(self, pid: int, comm: str) -> None:
        # libtraceevent adds a pid it has not seen; it never replaces a known name
        if pid and pid not in self._comms:
            self._comms[pid] = comm


class TextRenderer:
    """Turns :mod:`vmtrace.api` events into trace-cmd report lines.

    ``metadata`` is a :class:`vmtrace.format.metadata.TraceMetadata` (cmdlines, printk
    strings, kallsyms). The comm table starts from ``saved_cmdlines`` and, as in
    trace-cmd, learns names from sched_switch/sched_wakeup events as they are printed.
    """

    def __init__(self, metadata: Any, *, long_size: int = 8, kallsyms: Any = None):
        self.comms: Dict[int, str] = dict(getattr(metadata, "cmdlines", {}) or {})
        self.ctx = _Ctx(self.comms, kallsyms if kallsyms is not None
                        else getattr(metadata, "kallsyms", None))
        printk = getattr(metadata, "printk", {}) or {}
        self._printk = self.printk_lookup = printk.get
        self.long_size = long_size
        self._types: Dict[int, tuple] = {}
        self._pfs: Dict[int, Any] = {}
        self.failed: Dict[str, str] = {}   # event -> why its print fmt did not compile

    # ---------------------------------------------------------------- per event type
    def _prepare(self, fmt: Any) -> tuple:
        """(name column, info renderer) for one event type."""
        name = getattr(fmt, "name", "") or "(NULL)"
        col = event_name_column(name)
        fields = [field_info(f, self.long_size) for f in fmt.fields]
        pf = compile_print_fmt(fmt.print_fmt or "", fields, symbols=self.ctx.symbol, atoms=self.ctx.address,
                               printk=self._printk, long_size=self.long_size,
                               endian=getattr(fmt, "endian", "<"),
                               where=f"{fmt.system}:{name}")
        self._pfs[id(fmt)] = pf
        if pf.render_payload is not None:
            default = pf.render_payload
        else:
            self.failed[f"{fmt.system}:{name}"] = pf.failed or "unknown"
            default = _failed_renderer(fields)
        plug = plugin_for(fmt, default, self.ctx)
        return col, _guarded(plug or default, fields)

    def info(self, fmt: Any, payload: Any) -> str:
        """The event's text (what follows the name column)."""
        t = self._types.get(id(fmt))
        if t is None:
            t = self._types[id(fmt)] = (self._prepare(fmt), fmt)
        text = t[0][1](payload)
        # trace-cmd drops a trailing newline (every trace_marker event ends in one)
        return text[:-1] if text.endswith("\n") else text

    def printfmt(self, fmt: Any) -> Any:
        """The compiled print fmt (:class:`~vmtrace.format.printfmt.PrintFmt`) of ``fmt``."""
        if id(fmt) not in self._types:
            self._types[id(fmt)] = (self._prepare(fmt), fmt)
        return self._pfs.get(id(fmt))

    # ---------------------------------------------------------------- lines
    def comm(self, pid: int) -> str:
        if pid == 0:
            return "<idle>"
        return self.comms.get(pid, "<...>")

    def event_line(self, ev: Any) -> str:
        fmt = ev.fmt
        if fmt is None:
            return "%16s-%-5d [%03d] %s: [UNKNOWN EVENT]" % (self.comm(ev.pid), ev.pid, ev.cpu,
                                                              time_column(ev.ts))
        t = self._types.get(id(fmt))
        if t is None:
            t = self._types[id(fmt)] = (self._prepare(fmt), fmt)
        col, render = t[0]
        pid = ev.pid
        comm = "<idle>" if pid == 0 else self.comms.get(pid, "<...>")
        us = (ev.ts + 500) // 1000
        # the comm column is taken before the plugin runs, as in trace-cmd
        head = "%16s-%-5d [%03d] %5d.%06d: " % (comm, pid, ev.cpu, us // 1000000, us % 1000000)
        text = render(ev.payload)
        return head + col + (text[:-1] if text.endswith("\n") else text)

    def lines(self, items: Iterable[Any], prefix: str = "") -> Iterator[str]:
        """Lines for a stream of events and LostEvents markers from one buffer."""
        after_drop = set()
        event_line = self.event_line
        for it in items:
            if getattr(it, "kind", "event") == "lost":
                yield prefix + lost_text(it.cpu, it.count)
                after_drop.add(it.cpu)
                continue
            if after_drop and it.cpu in after_drop:
                after_drop.discard(it.cpu)
                yield event_line(it)
            else:
                yield prefix + event_line(it)


def header_lines(nr_cpus: int) -> list[str]:
    """What trace-cmd report prints on stdout before the events."""
    return ["cpus=%d" % nr_cpus]


# What rendering one event may raise on odd values (a %d of a string, a short payload):
# that event prints as [FAILED TO PARSE], the report goes on.
RENDER_ERRORS = (struct.error, IndexError, ValueError, TypeError, OverflowError, KeyError)


def _guarded(render: Callable[[Any], str], fields: list) -> Callable[[Any], str]:
    """Guest payloads can be short or odd: never let one event stop the report."""
    failed = _failed_renderer(fields)

    def safe(p: Any) -> str:
        try:
            return render(p)
        except RENDER_ERRORS:
            return failed(p)
    return safe


def _failed_renderer(fields: list) -> Callable[[Any], str]:
    """``[FAILED TO PARSE]`` and every field raw, as libtraceevent prints unparsable events."""
    own = [f for f in fields if not f.name.startswith("common_")]

    def render(p: Any) -> str:
        out = ["[FAILED TO PARSE]"]
        n = len(p)
        for f in own:
            out.append(" %s=" % f.name)
            if f.is_array:
                if f.is_dynamic:
                    if f.offset + 4 > n:
                        continue
                    v = int.from_bytes(p[f.offset:f.offset + 4], "little")
                    start, ln = v & 0xFFFF, v >> 16
                    if f.is_rel:
                        start += f.offset + 4
                else:
                    start, ln = f.offset, (f.size or max(0, n - f.offset))
                raw = bytes(p[start:start + ln])
                text = raw.split(b"\0", 1)[0]
                if f.is_string and text and all(32 <= c < 127 or c in (9, 10) for c in text):
                    out.append(text.decode("ascii"))
                else:
                    out.append("ARRAY[" + ", ".join("%02x" % c for c in raw) + "]")
            else:
                if f.offset + f.size > n or f.size not in (1, 2, 4, 8):
                    continue
                v = int.from_bytes(p[f.offset:f.offset + f.size], "little")
                if f.signed:
                    if v >> (8 * f.size - 1):
                        v -= 1 << (8 * f.size)
                    out.append("%d" % v)
                else:
                    out.append("%d" % (v & M64))
        return "".join(out)
    return render
