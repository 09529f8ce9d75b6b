"""What a trace needs besides its pages: task names, printk strings, kernel symbols, clock.

Events store pids, format-string addresses and code addresses; a reader turns them
back into names with ``saved_cmdlines``, ``printk_formats`` and ``/proc/kallsyms``. The
three texts come from a trace.dat or raw directory (guest data: parsed leniently, a
malformed line is skipped, nothing is trusted to be sorted or unique) or from the live
tracefs. kallsyms has ~200k lines and most reports never need it, so it is parsed on
first use.
"""
from __future__ import annotations

import bisect
import gzip
import re
from typing import Dict, List, Optional, Tuple, Union

Text = Union[str, bytes, None]

_CMDLINE_RE = re.compile(r"^\s*(\d+)\s+(.*?)\s*$")
_PRINTK_RE = re.compile(r'^\s*(?:0x)?([0-9a-fA-F]+)\s*:\s*"?(.*?)"?\s*$')

# Guest data bound: a kallsyms text larger than this is not a real one.
MAX_KALLSYMS = 256 << 20


def _as_text(data: Text) -> str:
    if data is None:
        return ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    return data


def parse_cmdlines(data: Text) -> Dict[int, str]:
    """``saved_cmdlines`` ("PID COMM" per line) -> {pid: comm}; later lines win."""
    out: Dict[int, str] = {}
    for line in _as_text(data).splitlines():
        m = _CMDLINE_RE.match(line)
        if m:
            out[int(m.group(1))] = m.group(2)
    return out


def parse_printk_formats(data: Text) -> Dict[int, str]:
    """``printk_formats`` ('0xADDR : "fmt"') -> {addr: fmt}, escapes kept as written.

    The kernel prints the format with C escapes (``\\n``); trace-cmd shows them
    unescaped, so we turn the common ones back into characters.
    """
    out: Dict[int, str] = {}
    for line in _as_text(data).splitlines():
        m = _PRINTK_RE.match(line)
        if m:
            try:
                out[int(m.group(1), 16)] = _unescape(m.group(2))
            except ValueError:
                continue
    return out


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    return (s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t")
            .replace('\\"', '"').replace("\0", "\\"))


class KallSyms:
    """Sorted kernel symbols for address -> "symbol+0xoff/0xsize" lookups (%pS, call_site).

    A symbol's size is the distance to the next higher address, as the kernel's own
    ``sprint_symbol`` would report for text without size information.
    """

    def __init__(self, data: Text = None):
        self._text = data
        self._addrs: Optional[List[int]] = None
        self._names: List[str] = []
        self._mods: List[str] = []
        self._by_name: Optional[Dict[str, int]] = None

    def _load(self) -> None:
        raw = self._text
        self._text = None
        if isinstance(raw, (bytes, bytearray)) and raw[:2] == b"\x1f\x8b":
            try:
                raw = gzip.decompress(bytes(raw))[:MAX_KALLSYMS]
            except (OSError, EOFError):
                raw = b""
        entries: List[Tuple[int, str, str]] = []
        for line in _as_text(raw).splitlines():
            parts = line.split()
            if len(parts) < 3:
                continue
            try:
                addr = int(parts[0], 16)
            except ValueError:
                continue
            if addr == 0:   # kptr_restrict hides addresses as zeros: useless for lookups
                continue
            mod = parts[3].strip("[]") if len(parts) > 3 else ""
            entries.append((addr, parts[2], mod))
        entries.sort(key=lambda e: e[0])
        self._addrs = [e[0] for e in entries]
        self._names = [e[1] for e in entries]
        self._mods = [e[2] for e in entries]

    def __len__(self) -> int:
        if self._addrs is None:
            self._load()
        return len(self._addrs or [])

    def lookup(self, addr: int) -> Optional[Tuple[str, int, int]]:
        """(name, offset, size) of the symbol containing ``addr``, or None."""
        if self._addrs is None:
            self._load()
        addrs = self._addrs or []
        i = bisect.bisect_right(addrs, addr) - 1
        if i < 0:
            return None
        # Several names can share one address; the last one sorted there is returned.
        start = addrs[i]
        nxt = addrs[i + 1] if i + 1 < len(addrs) else start
        size = nxt - start if nxt > start else 0
        if size and addr - start >= size:
            return None
        return self._names[i], addr - start, size

    def name(self, addr: int) -> Optional[str]:
        hit = self.lookup(addr)
        return hit[0] if hit else None

    def address(self, name: str) -> Optional[int]:
        """The address of symbol ``name`` (the lowest, if it appears more than once).

        libtraceevent resolves an identifier in a print fmt that is not a field this
        way, e.g. ``vmemmap_base`` in mm_page_alloc's page pointer.
        """
        if self._by_name is None:
            if self._addrs is None:
                self._load()
            by: Dict[str, int] = {}
            for a, n in zip(self._addrs or [], self._names):
                by.setdefault(n, a)
            self._by_name = by
        return self._by_name.get(name)

    def format(self, addr: int, *, with_size: bool = True) -> str:
        """``sym+0xoff/0xsize`` like %pS (``sym+0xoff`` without size), hex if unknown."""
        hit = self.lookup(addr)
        if hit is None:
            return f"0x{addr:x}"
        name, off, size = hit
        if with_size and size:
            return f"{name}+0x{off:x}/0x{size:x}"
        return f"{name}+0x{off:x}" if off else name


class TraceMetadata:
    """Names for pids, printk format addresses and code addresses, plus the trace clock."""

    def __init__(self, *, cmdlines: Text = None, printk_formats: Text = None,
                 kallsyms: Text = None, clock: Optional[str] = None):
        self.cmdlines: Dict[int, str] = parse_cmdlines(cmdlines)
        self.printk: Dict[int, str] = parse_printk_formats(printk_formats)
        self.kallsyms = KallSyms(kallsyms)
        self.clock = clock or "local"

    def comm(self, pid: int) -> str:
        """The task name trace-cmd would print for ``pid``."""
        if pid == 0:
            return "<idle>"
        return self.cmdlines.get(pid, "<...>")

    def printk_string(self, addr: int) -> Optional[str]:
        return self.printk.get(addr)

    @classmethod
    def from_source(cls, source, clock: Optional[str] = None) -> "TraceMetadata":
        """Metadata of a :class:`vmtrace.format.TraceSource` (trace.dat or raw dir)."""
        if clock is None:
            clock = (source.options or {}).get("clock") if hasattr(source, "options") else None
        return cls(cmdlines=source.cmdlines, printk_formats=source.printk_formats,
                   kallsyms=source.kallsyms, clock=clock)

    @classmethod
    def from_tracefs(cls, tf, *, kallsyms: bool = True) -> "TraceMetadata":
        """Live metadata from a :class:`vmtrace.tracefs.Tracefs` (its clock, global files)."""
        from vmtrace.tracefs import kallsyms as read_kallsyms
        return cls(cmdlines=tf.saved_cmdlines(), printk_formats=tf.printk_formats(),
                   kallsyms=read_kallsyms() if kallsyms else None, clock=tf.clock)
