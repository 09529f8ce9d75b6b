"""The drain loop: move every guest x CPU stream to disk without ever holding a guest up.

Two threads, each with one job, so that a slow disk can never stall the reading side:

* the **reader** waits on all sources (FIFO read ends or connected sockets) in one
  epoll set and ``splice``\\ s what is there into a per-stream *spill pipe*, a kernel
  pipe we own. Pipe-to-pipe splice moves page references, so trace bytes never pass
  through Python on this path and it never touches the disk.
* the **writer** ``splice``\\ s each spill pipe into its output file. If the disk is
  slow, only the writer blocks; the reader keeps emptying the guests' FIFOs.

Policy when the writer falls behind (documented in docs/host.md): each stream's spill
holds at most ``spill_bytes``. When it is full, the reader keeps reading the source
and throws away **whole ring-buffer pages**, counting them exactly (bytes and pages), so
the guest is never throttled and the file stays a clean sequence of pages. A page that
was half accepted when the spill filled is completed through a small userspace buffer
instead of being cut, so the output is always page aligned. A per-group byte cap
(``--max-size``) drops the same way. If writing fails (disk full, I/O error) the
stream stops writing, its file is cut back to a whole number of pages, and the error is
reported; everything accepted but not written is counted as lost.

For every stream at all times: ``received == written + dropped + unwritten``.

The reader sleeps a few milliseconds between rounds unless a source was close to full:
with 64 busy streams that turns thousands of tiny splices per second into fewer, larger
ones, which is where the CPU goes (a 1 MiB FIFO holds 10 ms even at 100 MB/s).
"""
from __future__ import annotations

import errno
import fcntl
import os
import select
import stat
import struct
import termios
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Hashable, List, Optional

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_MOVE = os.SPLICE_F_MOVE
_NB = os.SPLICE_F_NONBLOCK
_INT0 = b"\0\0\0\0"
_HUP = select.EPOLLHUP | select.EPOLLERR | select.EPOLLRDHUP
# ring-buffer page header: u64 timestamp, then `commit` (local_t) whose bit 31 says
# "events were lost before this page" and bit 30 "their count is stored after the data"
COMMIT_OFFSET = 8
RB_MISSED_EVENTS = 1 << 31
RB_MISSED_STORED = 1 << 30


def mark_missed(page: bytearray) -> None:
    """Flag a page as following lost events, count unknown (kbuffer: lost_events = -1).

    Bits 30/31 of a little-endian commit are in its low 32-bit word whether local_t is 4
    or 8 bytes. A count the kernel stored for its own overrun is dropped with STORED:
    it would understate what was lost here.
    """
    v = int.from_bytes(page[COMMIT_OFFSET:COMMIT_OFFSET + 4], "little")
    v = (v | RB_MISSED_EVENTS) & ~RB_MISSED_STORED
    page[COMMIT_OFFSET:COMMIT_OFFSET + 4] = v.to_bytes(4, "little")


def _fionread(fd: int) -> int:
    return struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, _INT0))[0]


def set_pipe_size(fd: int, size: int) -> int:
    """Grow a pipe or FIFO; keep what the kernel allows if it refuses (non-root limits)."""
    for want in (size, 1 << 20, 256 << 10):
        if want > size:
            continue
        try:
            return fcntl.fcntl(fd, F_SETPIPE_SZ, want)
        except OSError:
            continue
    return fcntl.fcntl(fd, F_GETPIPE_SZ)


class _AllEvents:
    """``set()`` wakes every writer (the reader does not track who has work)."""

    def __init__(self, events: List[threading.Event]):
        self.events = events

    def set(self) -> None:
        for e in self.events:
            e.set()


@dataclass
class Group:
    """Streams that share a byte cap: one guest."""

    name: Hashable
    max_bytes: Optional[int] = None
    accepted: int = 0


@dataclass
class Stream:
    """One source (a guest's CPU, or a host CPU) and the file it goes to."""

    label: Hashable
    group: Group
    src: int
    out: int
    page: int
    spill_r: int
    spill_w: int
    spill_cap: int
    close_src: bool = True
    src_cap: int = 0           # the source pipe's size (0: not a pipe, e.g. a socket)
    writer: int = 0            # which writer thread flushes this stream
    # counters (bytes unless said otherwise); see the module docstring's invariant
    received: int = 0          # taken from the source
    accepted: int = 0          # chosen to be kept (spill + tails)
    spilled: int = 0           # put into the spill pipe
    spill_out: int = 0         # taken out of the spill pipe by the writer
    written: int = 0           # in the output file
    dropped: int = 0           # thrown away by the reader, whole pages
    dropped_pages: int = 0
    dropped_cap: int = 0       # the part of `dropped` due to the group's byte cap
    keep: bool = True          # decision for the page being received
    drop_bulk: bool = False
    drop_cap: bool = False     # ...and if dropped, whether the byte cap was the reason
    slots_full: bool = False   # spill pipe out of slots before bytes (small source writes)
    tail: Optional[bytearray] = None  # rest of a half-kept page, completed in userspace
    tail_need: int = 0
    tail_ready: bool = False
    missed: bool = False       # pages were dropped since the last kept page: flag the next one
    patch: Optional[bytearray] = None  # that next page, read through userspace to be flagged
    patch_have: int = 0
    marked: int = 0            # pages flagged as following dropped pages
    eof: bool = False
    write_error: Optional[str] = None
    done: bool = False

    @property
    def unwritten(self) -> int:
        """Accepted but not (yet, or ever) in the file."""
        return self.accepted - self.written

    def stats(self) -> Dict[str, object]:
        return {
            "received": self.received,
            "written": self.written,
            "pages": self.written // self.page,
            "dropped": self.dropped + (self.unwritten if self.done else 0),
            "dropped_pages": self.dropped_pages + ((self.unwritten + self.page - 1) // self.page if self.done else 0),
            "dropped_cap": self.dropped_cap,
            "spilled_now": self.spilled - self.spill_out,
            "eof": self.eof,
            "error": self.write_error,
        }


class Drainer:
    """All streams of a recording: one reader thread, one writer thread."""

    def __init__(
        self,
        page_size: int = 4096,
        spill_bytes: int = 1 << 20,
        source_pipe_bytes: int = 1 << 20,
        batch_s: float = 0.01,
        on_error: Optional[Callable[[Stream, str], None]] = None,
        writers: int = 4,
    ):
        if page_size <= 0 or page_size & (page_size - 1):
            raise ValueError("page size must be a power of two")
        self.page = page_size
        self.spill_bytes = max(spill_bytes, 2 * page_size)
        self.source_pipe_bytes = source_pipe_bytes
        self.batch_s = batch_s
        self.on_error = on_error
        self.streams: List[Stream] = []
        self.groups: Dict[Hashable, Group] = {}
        self._by_fd: Dict[int, Stream] = {}
        self._ep = select.epoll()
        # Several writer threads: file writes are copies done by the kernel with the GIL
        # released, so they run in parallel, and one slow file does not hold up others.
        self.n_writers = max(1, writers)
        self._works = [threading.Event() for _ in range(self.n_writers)]
        self._work = _AllEvents(self._works)
        self._stop = threading.Event()
        self._final = False
        self._reader: Optional[threading.Thread] = None
        self._writers: List[threading.Thread] = []
        self._closing: List[Stream] = []
        self._linger_s = 2.0
        self._scratch = bytearray(256 << 10)
        self._lock = threading.Lock()
        self.errors: List[str] = []

    # -- setup -----------------------------------------------------------------------
    def group(self, name: Hashable, max_bytes: Optional[int] = None) -> Group:
        g = self.groups.get(name)
        if g is None:
            g = self.groups[name] = Group(name, max_bytes)
        elif max_bytes is not None:
            g.max_bytes = max_bytes
        return g

    def add(self, label: Hashable, src: int, out: int, group: Optional[Hashable] = None,
            close_src: bool = True) -> Stream:
        """Start draining ``src`` (non-blocking is set here) into the open file ``out``."""
        os.set_blocking(src, False)
        src_cap = 0
        try:
            if stat.S_ISFIFO(os.fstat(src).st_mode):
                src_cap = set_pipe_size(src, self.source_pipe_bytes)
        except OSError:
            pass
        r, w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        cap = set_pipe_size(w, self.spill_bytes)
        # The writer side blocks on the file, not on the pipe: it only asks for what is there.
        os.set_blocking(r, True)
        g = self.group(label[0] if group is None and isinstance(label, tuple) else (group if group is not None else label))
        groups = list(self.groups)
        s = Stream(label=label, group=g, src=src, out=out, page=self.page, spill_r=r, spill_w=w,
                   spill_cap=min(cap, self.spill_bytes), close_src=close_src, src_cap=src_cap,
                   writer=(groups.index(g.name) + len(self.streams)) % self.n_writers)
        with self._lock:
            self.streams.append(s)
            self._by_fd[src] = s
        self._ep.register(src, select.EPOLLIN | select.EPOLLRDHUP)
        return s

    def start(self) -> "Drainer":
        self._reader = threading.Thread(target=self._read_loop, name="vmtrace-drain-reader", daemon=True)
        self._writers = [threading.Thread(target=self._write_loop, args=(i,), name="vmtrace-drain-writer%d" % i,
                                          daemon=True) for i in range(self.n_writers)]
        self._reader.start()
        for t in self._writers:
            t.start()
        return self

    def stop(self, timeout: float = 30.0, linger_s: float = 2.0) -> None:
        """Take what the sources still hold (for at most ``linger_s``), write it, stop."""
        self._linger_s = linger_s
        self._stop.set()
        for t in [self._reader] + self._writers:
            if t is not None:
                t.join(timeout)
        self._reader = None
        self._writers = []
        for s in list(self.streams):
            self._finish(s)
        try:
            self._ep.close()
        except OSError:
            pass

    def close_stream(self, s: Stream) -> None:
        """The session decided this source is over (its guest left): drain it and end it.

        Done by the reader thread at its next round, so only one thread touches sources.
        """
        self._closing.append(s)

    # -- reader ------------------------------------------------------------------------
    def _read_loop(self) -> None:
        ep = self._ep
        deadline = None
        while True:
            stopping = self._stop.is_set()
            if stopping and deadline is None:
                deadline = time.monotonic() + self._linger_s
            while self._closing:
                s = self._closing.pop()
                if s.src in self._by_fd:
                    self._pull(s, 1 << 40)
                    self._end_source(s)
            try:
                evs = ep.poll(0 if stopping else 0.1)
            except OSError:
                return
            busy = False
            moved = 0
            for fd, ev in evs:
                s = self._by_fd.get(fd)
                if s is None:
                    continue
                n = self._pull(s, 8 << 20)
                moved += n
                if n >= self.source_pipe_bytes // 4:
                    busy = True
                if ev & _HUP and n == 0 and not self._available(s):
                    self._end_source(s)
            if moved or stopping:
                self._work.set()
            if stopping:
                if moved == 0 or time.monotonic() > deadline:
                    return
                continue
            if evs and not busy and self.batch_s:
                time.sleep(self.batch_s)

    def _available(self, s: Stream) -> int:
        try:
            return _fionread(s.src)
        except OSError:
            return 0

    def _end_source(self, s: Stream) -> None:
        # Whatever the source still holds will never be written: count it, exactly.
        s.drop_cap = False
        for _ in range(1 << 16):
            if self._available(s) <= 0 or self._drop(s, len(self._scratch)) <= 0:
                break
        try:
            self._ep.unregister(s.src)
        except (OSError, ValueError):
            pass
        self._by_fd.pop(s.src, None)
        if s.close_src:
            try:
                os.close(s.src)
            except OSError:
                pass
        s.eof = True
        self._work.set()

    def _drop_reason(self, s: Stream) -> Optional[str]:
        """Why the page starting now cannot be kept, or None. "error" and "cap" last."""
        if s.write_error is not None:
            return "error"
        g = s.group
        if g.max_bytes is not None and g.accepted + s.page > g.max_bytes:
            return "cap"
        if s.tail is not None:
            return "full"
        if s.slots_full:
            if s.spilled != s.spill_out:
                return "full"
            s.slots_full = False
        if s.spill_cap - (s.spilled - s.spill_out) < s.page:
            return "full"
        return None

    def _pull(self, s: Stream, budget: int) -> int:
        """Move what ``s``'s source holds now; return bytes taken from it."""
        P = s.page
        taken = 0
        while taken < budget:
            avail = self._available(s)
            if avail <= 0:
                break
            phase = s.received % P
            if s.tail is not None and not s.tail_ready:
                n = self._read_into_tail(s, avail)
                if n <= 0:
                    break
                taken += n
                continue
            if s.patch is not None:
                n = self._read_into_patch(s, avail)
                if n <= 0:
                    break
                taken += n
                continue
            if phase == 0:
                reason = self._drop_reason(s)
                s.keep = reason is None
                s.drop_cap = reason == "cap"
                # A full spill may drain any moment: decide again at the next page. A
                # cap or a dead disk is final: drop in bulk to keep up with the guest.
                s.drop_bulk = reason in ("cap", "error")
                if s.keep and s.missed:
                    # the first page kept after a drop carries the ring buffer's own
                    # "events lost" flag, so readers show the gap where it is
                    s.patch = bytearray(P)
                    s.patch_have = 0
                    s.missed = False
                    continue
            if not s.keep:
                if not s.drop_bulk and phase == 0 and avail < s.src_cap * 3 // 4:
                    # The source FIFO itself is the second half of the spill: leave the
                    # bytes there while it has room; drop only what would fill it.
                    break
                n = min(avail, len(self._scratch), budget - taken)
                n = self._drop(s, n if s.drop_bulk else min(n, P - phase))
                if n <= 0:
                    break
                s.missed = True
                taken += n
                continue
            room = s.spill_cap - (s.spilled - s.spill_out)
            if phase:
                want = P - phase
            else:
                want = room - room % P
                g = s.group
                if g.max_bytes is not None:
                    left = g.max_bytes - g.accepted
                    want = min(want, left - left % P)
            want = min(want, avail, budget - taken)
            if want <= 0:
                break
            try:
                n = os.splice(s.src, s.spill_w, want, flags=_MOVE | _NB)
            except BlockingIOError:
                n = 0
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET):
                    break
                raise
            if n > 0:
                _took(s, n)
                s.spilled += n
                taken += n
                continue
            if n == 0:
                # The source had the bytes, so the spill pipe ran out of slots (many
                # small writes fill slots before bytes).
                s.slots_full = True
                if s.received % P:
                    s.tail = bytearray(P - s.received % P)
                    s.tail_need = 0
                    s.tail_ready = False
                    continue
                break
        return taken

    def _read_into_tail(self, s: Stream, avail: int) -> int:
        tail = s.tail
        assert tail is not None
        n = _read_source(s.src, memoryview(tail)[s.tail_need:][:avail])
        if n <= 0:
            return 0
        _took(s, n)
        s.tail_need += n
        if s.tail_need == len(tail):
            s.tail_ready = True
            self._work.set()
        return n

    def _read_into_patch(self, s: Stream, avail: int) -> int:
        page = s.patch
        assert page is not None
        n = _read_source(s.src, memoryview(page)[s.patch_have:][:avail])
        if n <= 0:
            return 0
        _took(s, n)
        s.patch_have += n
        if s.patch_have == len(page):
            mark_missed(page)
            s.patch = None
            s.marked += 1
            try:
                # one page = PIPE_BUF: all of it goes into the spill, or nothing
                w = os.write(s.spill_w, page)
            except BlockingIOError:
                w = 0
            s.spilled += w
            if w < len(page):
                # spill out of slots: the writer writes the rest after the spill, like a tail
                rest = bytearray(page[w:])
                s.tail, s.tail_need, s.tail_ready = rest, len(rest), True
            self._work.set()
        return n

    def _drop(self, s: Stream, n: int) -> int:
        P = s.page
        got = _read_source(s.src, memoryview(self._scratch)[:n])
        if got <= 0:
            return 0
        r = s.received
        s.dropped_pages += -(-(r + got) // P) - -(-r // P)
        s.dropped += got
        if s.drop_cap:
            s.dropped_cap += got
        s.received += got
        return got

    # -- writer ------------------------------------------------------------------------
    def _write_loop(self, index: int) -> None:
        work = self._works[index]
        while True:
            # Read the reader's state *before* the last pass, so nothing it spilled is missed.
            final = self._stop.is_set() and not (self._reader and self._reader.is_alive())
            work.wait(0.05)
            work.clear()
            for s in list(self.streams):
                if s.writer == index:
                    self._flush(s)
            if final:
                return

    def _flush(self, s: Stream) -> None:
        while s.write_error is None:
            pending = s.spilled - s.spill_out
            if pending > 0:
                try:
                    n = os.splice(s.spill_r, s.out, pending, flags=_MOVE)
                except OSError as exc:
                    self._write_failed(s, exc)
                    return
                if n <= 0:
                    return
                s.spill_out += n
                s.written += n
                continue
            if s.tail is not None and s.tail_ready:
                try:
                    n = os.write(s.out, s.tail)
                    if n != len(s.tail):
                        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                except OSError as exc:
                    self._write_failed(s, exc)
                    return
                s.written += n
                s.tail = None
                s.tail_ready = False
                continue
            return

    def _write_failed(self, s: Stream, exc: OSError) -> None:
        what = "disk full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else (exc.strerror or str(exc))
        # Cut a half-written page so the file stays a clean page sequence.
        try:
            size = os.fstat(s.out).st_size
            keep = size - size % s.page
            os.ftruncate(s.out, keep)
            s.written = min(s.written, keep)
        except OSError:
            pass
        s.write_error = what
        msg = "%s: writing stopped after %d bytes: %s" % (s.label, s.written, what)
        self.errors.append(msg)
        if self.on_error:
            self.on_error(s, msg)

    def _finish(self, s: Stream) -> None:
        if s.done:
            return
        if not s.eof and s.src in self._by_fd:
            self._end_source(s)
        self._flush(s)
        rem = s.written % s.page
        if rem and s.write_error is None:
            # A source that ended mid-page (a garbage writer, a guest killed mid-write):
            # the fragment cannot be decoded, and leaving it would misalign nothing but
            # would make the file not a page sequence. Cut it; it counts as dropped.
            try:
                if stat.S_ISREG(os.fstat(s.out).st_mode):
                    os.ftruncate(s.out, s.written - rem)
                    s.written -= rem
            except OSError:
                pass
        for fd in (s.spill_r, s.spill_w):
            try:
                os.close(fd)
            except OSError:
                pass
        s.done = True

    # -- reporting ---------------------------------------------------------------------
    def snapshot(self) -> Dict[Hashable, Dict[str, object]]:
        return {s.label: s.stats() for s in list(self.streams)}

    def totals(self) -> Dict[str, int]:
        t = {"received": 0, "written": 0, "dropped": 0, "dropped_pages": 0}
        for s in list(self.streams):
            st = s.stats()
            for k in t:
                t[k] += int(st[k])  # type: ignore[arg-type]
        return t


def _took(s: Stream, n: int) -> None:
    """Count ``n`` bytes read from the source and kept (toward the group's cap too)."""
    s.received += n
    s.accepted += n
    s.group.accepted += n


def _read_source(fd: int, buf: memoryview) -> int:
    """Read what a guest stream has into ``buf``: 0 when nothing is there now or the
    writer has gone (EPIPE/ECONNRESET on sockets); other errors are real."""
    try:
        return os.readv(fd, [buf])
    except BlockingIOError:
        return 0
    except OSError as exc:
        if exc.errno in (errno.EPIPE, errno.ECONNRESET):
            return 0
        raise
