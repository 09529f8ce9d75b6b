"""Kernel symbol lookups for the bulk renderer, parsed with numpy.

Reports symbolise call sites and timer functions; a ~200k-line ``/proc/kallsyms`` parsed
per line in Python cost more than the rest of a small report, so the regular layout is
read in a few array operations and anything else falls back to the metadata's parser.
"""
from __future__ import annotations

from typing import Any, Dict, Optional

import numpy as np

from vmtrace.format.metadata import MAX_ADDR_DIGITS, kallsyms_text
from vmtrace.format.printfmt import M64

_U64 = np.uint64


class FastKallsyms:
    """The same lookups as :class:`vmtrace.format.metadata.KallSyms`, parsed with numpy.

    A regular ``/proc/kallsyms`` (16 hex digits, one space, a type letter, one space, a
    name) is read in a few array operations instead of a Python split per line; any
    other text goes to ``fallback`` (the metadata's own parser), so results never differ.
    """

    _WS = (9, 10, 11, 12, 13, 28, 29, 30, 31, 32)

    def __init__(self, raw: Any, fallback: Any):
        self._raw = raw
        self._text = raw if isinstance(raw, (bytes, bytearray, memoryview)) else None
        self._fallback = fallback
        self._addrs: Optional[np.ndarray] = None
        self._slow = False
        self._named: Dict[str, Optional[int]] = {}
        self._by_name: Optional[Dict[bytes, Optional[int]]] = None
        self._source = getattr(fallback, "source", None)     # the trace, for errors

    def address(self, name: str) -> Optional[int]:
        """A symbol's address by name (rare: print fmts naming kernel variables).

        The first line naming it, in file order (0 when kptr_restrict hid it: None). The
        index is built on the first call, in one pass: a search of the whole text per
        name cost 0.4 s each, and a print fmt can name a hundred.
        """
        if name in self._named:
            return self._named[name]
        text = self._text
        if text is not None and bytes(text[:2]) != b"\x1f\x8b":
            if self._by_name is None:
                self._by_name = _kallsyms_names(bytes(kallsyms_text(text, self._source) or b""))
            addr = self._by_name.get(name.encode())
        elif self._fallback is not None and hasattr(self._fallback, "address"):
            addr = self._fallback.address(name)
        else:
            addr = None
        self._named[name] = addr
        return addr

    def _load(self) -> None:
        raw = self._raw
        self._raw = None
        if isinstance(raw, str):
            self._slow = True
            return
        raw = bytes(raw or b"")
        if raw[:2] == b"\x1f\x8b":
            self._slow = True
            return
        parsed = _parse_kallsyms(kallsyms_text(raw, self._source))
        if parsed is None:
            self._slow = True
            return
        self._addrs, self._starts, self._ends, self._bytes = parsed

    def lookup(self, addr: int) -> Optional[tuple]:
        if self._addrs is None and not self._slow:
            self._load()
        if self._slow:
            return self._fallback.lookup(addr) if self._fallback is not None else None
        addrs = self._addrs
        if not addrs.shape[0] or addr < 0 or addr > M64:
            return None
        i = int(np.searchsorted(addrs, _U64(addr), side="right")) - 1
        if i < 0:
            return None
        start = int(addrs[i])
        nxt = int(addrs[i + 1]) if i + 1 < addrs.shape[0] else start
        size = nxt - start if nxt > start else 0
        if size and addr - start >= size:
            return None
        name = self._bytes[int(self._starts[i]):int(self._ends[i])].split(None, 1)[0].decode()
        return name, addr - start, size


def _kallsyms_names(text: bytes) -> Dict[bytes, Optional[int]]:
    """name -> address of its first ``ADDR TYPE NAME`` line (None for a zero address)."""
    out: Dict[bytes, Optional[int]] = {}
    for line in text.split(b"\n"):
        a = line.find(b" ")
        b = line.find(b" ", a + 1)
        if a <= 0 or b <= a + 1 or a > MAX_ADDR_DIGITS:
            continue
        kind = line[a + 1:b]
        if kind.split() != [kind]:
            continue
        name = line[b + 1:].split(b"\t", 1)[0].split(b" ", 1)[0]
        if name in out or not name or line[:a].strip(b"0123456789abcdefABCDEF"):
            continue
        out[name] = int(line[:a], 16) or None
    return out


def _parse_kallsyms(raw: bytes) -> Optional[tuple]:
    """(sorted addresses, name starts, line ends, text) or None if not regular.

    Regular means what the per-line parser would read as ``addr type name [mod]`` with
    exactly one space between the first three: then the name is the bytes from column
    19 to the next space or tab, read when a lookup needs it.
    """
    empty = (np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64), raw)
    if not raw:
        return empty
    # bytes str.splitlines()/split() treat specially; non-ASCII decodes with replacement
    if not raw.isascii() or any(bytes([c]) in raw for c in b"\r\x0b\x0c\x1c\x1d\x1e\x1f"):
        return None
    a = np.frombuffer(raw, np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.concatenate(([0], nl + 1))
    ends = np.concatenate((nl, [a.shape[0]]))
    keep = ends > starts
    starts, ends = starts[keep], ends[keep]
    if not starts.shape[0]:
        return empty
    if (ends - starts < 20).any():
        return None
    if not (a[starts + 16] == 32).all() or not (a[starts + 18] == 32).all():
        return None
    for col in (a[starts + 17], a[starts + 19]):
        if ((col == 32) | (col == 9)).any():
            return None
    lut = np.full(256, 255, np.uint8)
    lut[np.frombuffer(b"0123456789abcdef", np.uint8)] = np.arange(16)
    lut[np.frombuffer(b"ABCDEF", np.uint8)] = np.arange(10, 16)
    digits = lut[np.lib.stride_tricks.sliding_window_view(a, 16)[starts]]
    if (digits == 255).any():
        return None
    addrs = np.zeros(starts.shape[0], np.uint64)
    four = np.uint64(4)
    for k in range(16):
        addrs = (addrs << four) | digits[:, k]
    nz = addrs != 0
    addrs, nstart, ends = addrs[nz], (starts + 19)[nz], ends[nz]
    order = np.argsort(addrs, kind="stable")
    return addrs[order], nstart[order], ends[order], raw
