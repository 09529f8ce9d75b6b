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
from typing import Any, Dict, List, Optional, Tuple, Union

from vmtrace.errors import FormatError
from vmtrace.format.compress import MAX_GUNZIP, gunzip_bounded

Text = Union[str, bytes, None]

# Guest data bound: a kallsyms text larger than this is not a real one (a big kernel's
# with modules is ~15 MB), gzip'd or not.
MAX_KALLSYMS = MAX_GUNZIP
# The per-line parser and the by-name index keep ~250 bytes of Python objects per line,
# so a text may have at most this many lines, which a real kernel (~120k-400k symbols)
# never reaches: 1M lines ~ 250 MB.
MAX_SYMBOLS = 1 << 20
# A pid has at most 10 digits, an address 16 hex digits; a longer number is not one
# (and int() of a 5000-digit text raises instead of parsing).
MAX_PID_DIGITS = 19
MAX_ADDR_DIGITS = 16
_HEX = frozenset("0123456789abcdefABCDEF")


def _as_text(data: Text) -> str:
    if data is None:
        return ""
    if isinstance(data, (bytes, bytearray, memoryview)):
        return bytes(data).decode("utf-8", errors="replace")
    return data


def parse_cmdlines(data: Text) -> Dict[int, str]:
    """``saved_cmdlines`` ("PID COMM" per line) -> {pid: comm}; later lines win.

    String methods, not a regex: ``(.*?)\\s*$`` over a line of padding is quadratic.
    """
    out: Dict[int, str] = {}
    for line in _as_text(data).splitlines():
        s = line.lstrip()
        i = 0
        while i < len(s) and s[i].isdecimal():
            i += 1
        if 0 < i <= MAX_PID_DIGITS and i < len(s) and s[i].isspace():
            out[int(s[:i])] = s[i:].strip()
    return out


def parse_printk_formats(data: Text) -> Dict[int, str]:
    """``printk_formats`` ('0xADDR : "fmt"') -> {addr: fmt}, escapes kept as written.

    The kernel prints the format with C escapes (``\\n``); trace-cmd shows them
    unescaped, so we turn the common ones back into characters. Parsed with string
    methods in one pass per line (a regex with two lazy parts was quadratic).
    """
    out: Dict[int, str] = {}
    for line in _as_text(data).splitlines():
        s = line.strip()
        i = 2 if s[:2] == "0x" and s[2:3] in _HEX else 0
        j = i
        while j < len(s) and s[j] in _HEX:
            j += 1
        rest = s[j:].lstrip()
        if j == i or j - i > MAX_ADDR_DIGITS or rest[:1] != ":":
            continue
        text = rest[1:].lstrip()
        if text.startswith('"'):
            text = text[1:]
        if text.endswith('"'):
            text = text[:-1]
        out[int(s[i:j], 16)] = _unescape(text)
    return out


def _unescape(s: str) -> str:
    if "\\" not in s:
        return s
    return (s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t")
            .replace('\\"', '"').replace("\0", "\\"))


def kallsyms_text(raw: Text, source: Optional[str] = None) -> Text:
    """The kallsyms text, gunzipped when it is gzip data (as a guest may send it), and
    refused past :data:`MAX_KALLSYMS` bytes either way. ``source`` names the trace in
    errors."""
    if isinstance(raw, (bytes, bytearray, memoryview)) and bytes(raw[:2]) == b"\x1f\x8b":
        raw = gunzip_bounded(raw, MAX_KALLSYMS, what="kallsyms", source=source)
    if raw is not None and len(raw) > MAX_KALLSYMS:
        raise FormatError(f"kallsyms: {len(raw)} bytes, more than the {MAX_KALLSYMS}-byte limit",
                          source=source)
    if raw and raw.count(b"\n" if isinstance(raw, (bytes, bytearray, memoryview)) else "\n") > MAX_SYMBOLS:
        raise FormatError(f"kallsyms: more than {MAX_SYMBOLS} lines, not a real kernel's "
                          "symbol table", source=source)
    return raw


class KallSyms:
    """Sorted kernel symbols for address -> "symbol+0xoff/0xsize" lookups (%pS, call_site).

    A symbol's size is the distance to the next higher address, as the kernel's own
    ``sprint_symbol`` would report for text without size information.
    """

    def __init__(self, data: Text = None, source: Optional[str] = None):
        self._text = data
        self.source = source
        self._addrs: Optional[List[int]] = None
        self._names: List[str] = []
        self._mods: List[str] = []
        self._by_name: Optional[Dict[str, int]] = None

    def _load(self) -> None:
        raw = self._text
        self._text = None
        raw = kallsyms_text(raw, self.source)
        entries: List[Tuple[int, str, str]] = []
        for line in _as_text(raw).splitlines():
            parts = line.split()
            if len(parts) < 3 or len(parts[0]) > MAX_ADDR_DIGITS:
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
                 kallsyms: Text = None, clock: Optional[str] = None, source: Optional[str] = None):
        self.cmdlines: Dict[int, str] = parse_cmdlines(cmdlines)
        self.printk: Dict[int, str] = parse_printk_formats(printk_formats)
        self.kallsyms = KallSyms(kallsyms, source)
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
                   kallsyms=source.kallsyms, clock=clock, source=getattr(source, "path", None))

    @classmethod
    def from_tracefs(cls, tf: Any, *, kallsyms: Optional[bytes] = None) -> "TraceMetadata":
        """Live metadata from a :class:`vmtrace.tracefs.Tracefs` (its clock, global files).

        ``kallsyms`` is the caller's copy of ``/proc/kallsyms`` (``vmtrace.tracefs.kallsyms()``):
        format/ reads only what it is handed, so it never imports tracefs itself.
        """
        return cls(cmdlines=tf.saved_cmdlines(), printk_formats=tf.printk_formats(),
                   kallsyms=kallsyms, clock=tf.clock)
