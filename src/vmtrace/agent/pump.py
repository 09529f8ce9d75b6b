"""One pump per traced CPU: trace_pipe_raw -> pipe -> sink, by splice.

Why it looks like this:
- The kernel answers EAGAIN when no *full* page is ready; that means "no data yet".
  Instead of the seed's fixed 100 ms sleep we poll() trace_pipe_raw, which ftrace
  wakes only once ``buffer_percent`` of the CPU's buffer is full: few wake-ups, and
  the ring buffer never runs over at the rates the seed lost data at.
- A partial page is only handed out by read(), so when nothing has moved for
  ``flush_interval`` the pump reads one (a copy, about once a second at most) and
  pushes it through the same pipe, which keeps the page order intact.
- The sink may stop reading (a host that hangs). The pump never blocks on it: the pipe
  fills, the pump stops taking pages, ftrace overwrites (the loss shows in the CPU's
  ``overrun``), and at exit whatever could not be sent within ``exit_grace`` seconds is
  dropped and counted in ``pages_dropped``.
"""
from __future__ import annotations

import errno
import os
import select
import sys
import threading
import time
from typing import Dict, List, Optional

from vmtrace.agent.splice import SPLICE_F_MORE, SPLICE_F_MOVE, SPLICE_F_NONBLOCK, make_pipe, splice

IDLE, RUN, EXIT = "idle", "run", "exit"
BACKOFF = 0.05  # seconds without polling trace_pipe_raw after a wake-up that had no full page


class Sink:
    """Where a pump's pages go. ``fd`` is polled for POLLOUT when a send stalls."""

    fd: Optional[int] = None
    name = "sink"

    def send(self, pipe_r: int, n: int) -> int:
        """Move up to n bytes out of the pipe; return how many (0 if it would block)."""
        raise NotImplementedError

    def close(self) -> None:
        pass


class FdSink(Sink):
    """A port, FIFO, unix socket or regular file, written by splice."""

    def __init__(self, fd: int, name: str, own: bool = True):
        self.fd, self.name, self._own = fd, name, own

    def send(self, pipe_r: int, n: int) -> int:
        try:
            return splice(pipe_r, self.fd, n, SPLICE_F_MOVE | SPLICE_F_MORE | SPLICE_F_NONBLOCK)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self._own and self.fd is not None:
            try:
                os.close(self.fd)
            except OSError:
                pass
            self.fd = None


class PumpStats:
    __slots__ = ("bytes_sent", "pages_sent", "pages_dropped", "partial_pages", "wakeups", "error")

    def __init__(self) -> None:
        self.bytes_sent = 0
        self.pages_sent = 0
        self.pages_dropped = 0
        self.partial_pages = 0
        self.wakeups = 0
        self.error: Optional[str] = None

    def as_dict(self) -> Dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


class Pump(threading.Thread):
    """Moves one CPU's ring-buffer pages while the agent is started."""

    def __init__(
        self,
        cpu: int,
        trace_path: str,
        sink: Sink,
        page_size: int,
        pipe_size: int,
        flush_interval: float,
        exit_grace: float = 2.0,
        nice: int = 0,
        fifo_priority: Optional[int] = None,
    ):
        super().__init__(name="pump-cpu%d" % cpu, daemon=True)
        self.cpu = cpu
        self.trace_path = trace_path
        self.sink = sink
        self.page = page_size
        self.flush_interval = flush_interval
        self.exit_grace = exit_grace
        self.nice = nice
        self.fifo_priority = fifo_priority
        self.stats = PumpStats()
        self.tid: Optional[int] = None
        self.started_evt = threading.Event()
        self._lock = threading.Lock()
        self._want = IDLE
        self._grace: Optional[float] = None
        self._waiters: List[threading.Event] = []
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._trace_fd = os.open(trace_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        self._r, self._w, self._cap = make_pipe(pipe_size)
        self._pending = 0  # bytes in our pipe not yet sent
        self._broken = False  # the sink refused for good (EPIPE): stop taking pages
        self._devnull: Optional[int] = None

    # -- called from other threads ------------------------------------------------------
    def request(self, want: str, grace: Optional[float] = None) -> threading.Event:
        """Ask for a state; the event is set once the pump is there (flushed, for idle).

        ``grace``: for idle, how long to wait for the sink to take the rest (default
        ``exit_grace``; 0 when the host is known to be gone).
        """
        ev = threading.Event()
        with self._lock:
            self._want = want
            self._grace = grace
            self._waiters.append(ev)
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass
        return ev

    # -- the thread -----------------------------------------------------------------------
    def run(self) -> None:
        self.tid = threading.get_native_id()
        if self.nice:
            # At 100 MB/s a 4 MB buffer's 50 % watermark leaves ~20 ms to react; on a CPU
            # shared with other work a higher CFS weight gets the pump there in time.
            try:
                os.setpriority(os.PRIO_PROCESS, self.tid, self.nice)
            except OSError:
                pass
        if self.fifo_priority:
            # Opt-in (--pump-priority): on a guest busy on every CPU a normal-priority pump
            # can miss the watermark window; a real-time one preempts the workload instead.
            try:
                os.sched_setscheduler(self.tid, os.SCHED_FIFO, os.sched_param(self.fifo_priority))
            except OSError as exc:
                self.stats.error = "cannot set SCHED_FIFO %d: %s" % (self.fifo_priority, exc.strerror)
                print("vmtrace-agent: cpu%d: %s" % (self.cpu, self.stats.error), file=sys.stderr)
        self.started_evt.set()
        running = False
        last_move = time.monotonic()
        backoff_until = 0.0
        try:
            while True:
                with self._lock:
                    want, waiters, self._waiters = self._want, self._waiters, []
                    grace = self.exit_grace if self._grace is None else self._grace
                if want == RUN and not running:
                    running, last_move = True, time.monotonic()
                elif want != RUN and running:
                    self._final_flush(grace)
                    running = False
                for ev in waiters:
                    ev.set()
                if want == EXIT:
                    return
                if running and self._move():
                    last_move = time.monotonic()
                fds = [(self._wake_r, select.POLLIN)]
                now = time.monotonic()
                if running and not self._broken and self._room() >= self.page and now >= backoff_until:
                    fds.append((self._trace_fd, select.POLLIN))
                if self._pending and self.sink.fd is not None:
                    fds.append((self.sink.fd, select.POLLOUT))
                timeout = None
                if running:
                    timeout = max(0.0, last_move + self.flush_interval - now)
                    if now < backoff_until:
                        timeout = min(timeout, backoff_until - now)
                events = _poll(fds, timeout)
                self.stats.wakeups += 1
                if any(fd == self._wake_r for fd, _ in events):
                    _drain_fd(self._wake_r)
                if running and any(fd == self._trace_fd for fd, _ in events):
                    if self._move():
                        last_move = time.monotonic()
                    else:
                        # Readable but no full page (buffer_percent 0, or a tiny buffer
                        # whose watermark is the page being written): do not spin.
                        backoff_until = time.monotonic() + BACKOFF
                if running and time.monotonic() >= last_move + self.flush_interval:
                    self._move()
                    self._read_partial()
                    self._move()
                    last_move = time.monotonic()
        except Exception as exc:  # noqa: BLE001 - a pump must report, never die silently
            self.stats.error = "%s: %s" % (type(exc).__name__, exc)
            print("vmtrace-agent: cpu%d pump stopped: %s" % (self.cpu, self.stats.error), file=sys.stderr)
            with self._lock:
                waiters, self._waiters = self._waiters, []
            for ev in waiters:
                ev.set()
        finally:
            self._close()

    def _room(self) -> int:
        return (self._cap - self._pending) // self.page * self.page

    def _move(self) -> bool:
        """Take full pages and send them until neither side makes progress."""
        moved = False
        while True:
            progress = False
            room = self._room()
            if room >= self.page and not self._broken:
                try:
                    n = splice(self._trace_fd, self._w, room, SPLICE_F_MOVE | SPLICE_F_NONBLOCK)
                except BlockingIOError:
                    n = 0  # no full page ready: not an error
                if n > 0:
                    self._pending += n
                    progress = True
            if self._pending and self._send():
                progress = True
            if not progress:
                return moved
            moved = True

    def _send(self) -> int:
        try:
            n = self.sink.send(self._r, self._pending)
        except OSError as exc:
            if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENODEV, errno.EIO):
                if not self._broken:
                    print("vmtrace-agent: cpu%d: %s closed (%s); pages from now on are dropped"
                          % (self.cpu, self.sink.name, exc.strerror), file=sys.stderr)
                self._broken = True
                self._discard()
                return 0
            raise
        if n > 0:
            before = self.stats.bytes_sent // self.page
            self._pending -= n
            self.stats.bytes_sent += n
            self.stats.pages_sent += self.stats.bytes_sent // self.page - before
        return n

    def _read_partial(self) -> bool:
        """Read the current partial page (a copy) so quiet CPUs still deliver."""
        if self._broken or self._room() < self.page:
            return False
        try:
            data = os.read(self._trace_fd, self.page)
        except BlockingIOError:
            return False
        if not data:
            return False
        if len(data) < self.page:
            data += bytes(self.page - len(data))
        _write_all(self._w, data[: self.page])
        self._pending += self.page
        self.stats.partial_pages += 1
        return True

    def replace_sink(self, sink: Sink) -> None:
        """A new host connected (sockets): send to ``sink`` from now on. Only while idle,
        when our pipe is empty (the stop flushed or dropped it)."""
        with self._lock:
            old, self.sink = self.sink, sink
            self._broken = False
        if old is not sink:
            old.close()

    def _final_flush(self, grace: Optional[float] = None) -> None:
        """On stop: every full page, then the partial ones, then wait for the sink."""
        grace = self.exit_grace if grace is None else grace
        budget = 4096  # bounded: a writer on that CPU may keep producing while we flush
        while budget > 0:
            budget -= 1
            self._move()
            if not self._read_partial():
                if self._room() < self.page and self._pending and not self._broken:
                    if not self._wait_sink(grace):
                        break
                    continue
                break
        self._move()
        deadline = time.monotonic() + grace
        while self._pending and not self._broken:
            if self._send():
                continue
            left = deadline - time.monotonic()
            if left <= 0 or not self._wait_sink(left):
                break
        if self._pending:
            self._discard(grace)

    def _wait_sink(self, timeout: float) -> bool:
        if self.sink.fd is None:
            return True
        return bool(_poll([(self.sink.fd, select.POLLOUT)], timeout))

    def _discard(self, grace: Optional[float] = None) -> None:
        """Drop what is in our pipe, counting whole pages (the sink will not take them)."""
        if not self._pending:
            return
        if self._devnull is None:
            self._devnull = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        sent_partial = self.stats.bytes_sent % self.page
        pages = (self._pending + sent_partial + self.page - 1) // self.page
        while self._pending:
            try:
                n = splice(self._r, self._devnull, self._pending, SPLICE_F_NONBLOCK)
            except BlockingIOError:
                n = 0
            if n <= 0:
                break
            self._pending -= n
        self._pending = 0
        self.stats.pages_dropped += pages
        if not self._broken:
            print("vmtrace-agent: cpu%d: %s did not take %d pages within %.1fs; dropped them"
                  % (self.cpu, self.sink.name, pages, self.exit_grace if grace is None else grace), file=sys.stderr)

    def _close(self) -> None:
        for fd in (self._trace_fd, self._r, self._w, self._wake_r, self._wake_w, self._devnull):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.sink.close()


def _poll(fds: "list[tuple[int, int]]", timeout: Optional[float]) -> "list[tuple[int, int]]":
    p = select.poll()
    for fd, ev in fds:
        p.register(fd, ev)
    ms = None if timeout is None else int(timeout * 1000 + 0.999)
    return p.poll(ms)


def _drain_fd(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            _poll([(fd, select.POLLOUT)], 1.0)
            continue
        view = view[n:]
