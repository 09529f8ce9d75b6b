"""A flight recorder's per-stream store: the newest pages of one guest CPU, on disk, in
bounded space (issue 16, `vmtrace record --ring`; not wired into the recorder yet).

A recording that runs for days cannot keep everything, and must not stop draining when
its space is used up (a guest whose FIFO fills stalls, see host/drain.py). A
:class:`RingFile` is a file of fixed capacity, a whole number of ring-buffer pages,
written circularly: byte ``k`` of the stream lands at ``k mod capacity``. The drain's
writer splices straight into it at :meth:`place`'s offset (``os.splice`` with
``offset_dst``), so bytes still never pass through Python. Whole pages fall off the old
end as new ones come in, and are counted (:attr:`dropped_pages`).

:meth:`window` picks the newest complete pages, all of them or only those whose page
timestamp is within ``last_ns`` of the newest page's (``--last 10s``; the page header's
first 8 bytes are the trace-clock time of its first event), and :meth:`copy_window`
copies them in stream order into a snapshot's ``cpuN`` file while the ring keeps
running. The writer may overwrite a slot while it is being copied; like a sequence
lock, the copy checks the write position afterwards and drops (and counts) every page
whose slot was reused meanwhile, so a snapshot never holds a torn page.

One writer and any number of snapshot readers: :meth:`place`/:meth:`advance` are
called by the writer only; ``head`` is one Python int, replaced atomically.

Hooks this needs elsewhere (for the recorder's owners): drain.Stream gets an optional
``ring``; its ``_flush`` splices ``n = ring.place(avail)[1]`` bytes to offset
``ring.place(avail)[0]`` and calls ``ring.advance(written)``; record's ``--ring SIZE``
builds one RingFile per guest CPU (capacity = SIZE / CPUs, rounded down to pages);
a snapshot request (SIGUSR1 or ``vmtrace snapshot``) calls ``copy_window`` for each
stream into a raw directory and writes trace.dat and session.json from it as
host/outputs.py does at the end of a recording today.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import List, Optional, Tuple

from vmtrace.errors import VmtraceError

MAX_RING_BYTES = 1 << 40        # a per-stream ring larger than 1 TiB is a mistake
_U64 = struct.Struct("<Q")


@dataclass(frozen=True)
class Window:
    """Pages to copy, oldest first: ``seqs`` are page numbers in the stream (0 = the
    first page ever written), ``skipped`` the complete pages left out by ``last_ns``."""

    seqs: Tuple[int, ...]
    skipped: int


class RingFile:
    """A fixed-capacity circular file of whole ring-buffer pages (see the module doc)."""

    def __init__(self, path: str, capacity: int, page_size: int, *, ts_endian: str = "<") -> None:
        if page_size <= 0 or page_size & (page_size - 1) or page_size > 1 << 20:
            raise VmtraceError("ring: page size %r is not a power of two up to 1 MiB" % (page_size,))
        pages = capacity // page_size
        if pages < 2 or capacity > MAX_RING_BYTES:
            raise VmtraceError("ring: %s: capacity %d bytes holds %d pages of %d; want at least 2 and at most "
                               "%d bytes" % (path, capacity, pages, page_size, MAX_RING_BYTES))
        self.path = path
        self.page_size = page_size
        self.pages = pages
        self.capacity = pages * page_size
        self.head = 0                 # bytes ever written (the writer's position in the stream)
        self.torn = 0                 # pages a snapshot dropped because the writer reused their slot
        self._claim = 0               # head after the write in progress (the writer's next position)
        self._ts = struct.Struct(ts_endian + "Q")
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        except OSError as exc:
            raise VmtraceError("ring: cannot create %s: %s" % (path, exc.strerror)) from None

    # -- the writer's side -------------------------------------------------------------
    def place(self, n: int) -> Tuple[int, int]:
        """Where the next bytes go: (file offset, how many of ``n`` fit before the end
        of the file; the rest go to offset 0 on the next call)."""
        off = self.head % self.capacity
        n = min(n, self.capacity - off)
        self._claim = self.head + n       # announced before the bytes land: see copy_window
        return off, n

    def advance(self, n: int) -> None:
        """``n`` bytes were written at :meth:`place`'s offset."""
        self.head += n

    def write(self, data: bytes) -> None:
        """Append bytes (what the drain does with splice, for callers holding bytes)."""
        mv = memoryview(data)
        while mv:
            off, n = self.place(len(mv))
            done = os.pwrite(self.fd, mv[:n], off)
            self.advance(done)
            mv = mv[done:]

    # -- what is kept --------------------------------------------------------------------
    @property
    def complete_pages(self) -> int:
        """Pages ever completed (a page being written is not one yet)."""
        return self.head // self.page_size

    @property
    def dropped_pages(self) -> int:
        """Whole pages that fell off the old end: written once, overwritten since.

        The page being written counts as occupying its slot, so the ring holds
        ``pages - 1`` complete pages once it has wrapped."""
        return max(0, -(-self.head // self.page_size) - self.pages)

    def _oldest_kept(self, head: int) -> int:
        return max(0, -(-head // self.page_size) - self.pages)

    def page_ts(self, seq: int) -> int:
        raw = os.pread(self.fd, 8, (seq % self.pages) * self.page_size)
        if len(raw) != 8:
            raise VmtraceError("ring: %s: page %d unreadable (file shorter than the ring)" % (self.path, seq))
        return self._ts.unpack(raw)[0]

    def window(self, last_ns: Optional[int] = None) -> Window:
        """The newest complete pages: every one the ring holds, or those whose first
        event is at most ``last_ns`` older than the newest page's first event."""
        head = self.head
        end = head // self.page_size
        first = self._oldest_kept(head)
        seqs = list(range(first, end))
        skipped = 0
        if last_ns is not None and seqs:
            if last_ns < 0:
                raise VmtraceError("ring: --last must not be negative")
            newest = self.page_ts(seqs[-1])
            lo = 0
            while lo < len(seqs) and self.page_ts(seqs[lo]) + last_ns < newest:
                lo += 1
            skipped, seqs = lo, seqs[lo:]
        return Window(tuple(seqs), skipped)

    def copy_window(self, out_fd: int, last_ns: Optional[int] = None) -> Tuple[int, int]:
        """Copy :meth:`window`'s pages, oldest first, to ``out_fd`` (appended); return
        (pages written, pages dropped because the writer reused their slot meanwhile).

        The pages are read first, then ``head`` is read again: a page whose slot the
        writer has reached since may be torn, and is left out.
        """
        win = self.window(last_ns)
        got: List[Tuple[int, bytes]] = []
        for seq in win.seqs:
            data = os.pread(self.fd, self.page_size, (seq % self.pages) * self.page_size)
            got.append((seq, data))
        # After the reads, the seqlock's second look: at the position the writer has
        # claimed (place() announces a write before its bytes land), not only reached.
        safe_from = self._oldest_kept(max(self.head, self._claim))
        kept = [(s, d) for s, d in got if s >= safe_from and len(d) == self.page_size]
        torn = len(got) - len(kept)
        self.torn += torn
        for _s, d in kept:
            mv = memoryview(d)
            while mv:
                mv = mv[os.write(out_fd, mv):]
        return len(kept), torn

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def stats(self) -> dict:
        return {"capacity": self.capacity, "page_size": self.page_size, "bytes": self.head,
                "pages": self.complete_pages, "dropped_pages": self.dropped_pages, "torn_pages": self.torn}


def parse_ring(text: str) -> Tuple[str, int]:
    """``--ring`` as ("bytes", n) for ``64M``/``2G``/``4096K`` or ("ns", n) for ``5m``/``30s``/``1h``.

    Sizes take binary suffixes K, M, G (capitals: they are bytes); durations take s, m,
    h (lower case, as ``--duration``); a bare number is refused, it could be either.
    """
    t = text.strip()
    units_b = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    units_t = {"ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}
    for suf, mul in sorted(units_t.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(suf) and _number(t[:-len(suf)]):
            ns = int(float(t[:-len(suf)]) * mul)
            if 0 < ns <= 366 * 86400 * 10**9:
                return "ns", ns
            break
    for suf, mul in units_b.items():
        if t.endswith((suf, suf + "B", suf + "iB")) and _number(t.rstrip("iB")[:-1]):
            n = int(float(t.rstrip("iB")[:-1]) * mul)
            if 0 < n <= MAX_RING_BYTES:
                return "bytes", n
            break
    raise VmtraceError("--ring %.40r: want a size like 256M or 2G, or a duration like 30s or 5m" % text)


def _number(s: str) -> bool:
    if not s or len(s) > 20:
        return False
    try:
        return float(s) > 0
    except ValueError:
        return False
