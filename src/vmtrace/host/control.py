"""The host's end of one guest's control port: requests, replies, and plain seed orders.

Everything here is non-blocking with deadlines, because a guest can stop answering at
any moment (killed agent, paused VM) and the recorder must keep draining the others.
Replies are matched to requests by ``id``; anything malformed from the guest is counted
and skipped (the protocol decoder resynchronises), never raised out of the session.
"""
from __future__ import annotations

import errno
import os
import select
import socket
import time
from typing import Any, Dict, List, Optional

from vmtrace import protocol
from vmtrace.errors import VmtraceError


class AgentLink:
    """A control channel: ``wfd`` carries host -> agent, ``rfd`` agent -> host."""

    def __init__(self, name: str, rfd: Optional[int], wfd: Optional[int], kind: str):
        self.name = name
        self.rfd = rfd
        self.wfd = wfd
        self.kind = kind  # "fifo" or "socket"
        self.decoder = protocol.Decoder(allow_orders=False, source="%s control" % name)
        self.replies: Dict[Any, protocol.Message] = {}
        self.unsolicited: List[protocol.Message] = []
        self.garbage = 0
        self.errors: List[str] = []
        self.eof = False
        self._seq = 0
        self._seen_writer = False
        self.last_rx = 0.0  # time.monotonic() of the last bytes read from the agent

    # -- opening -------------------------------------------------------------------------
    @classmethod
    def fifo(cls, name: str, ctl_base: str) -> "AgentLink":
        """QEMU's pipe chardev: we write ``.in`` and read ``.out``.

        ``.in`` is opened read-write so the open never blocks or fails for want of a
        reader (QEMU or a test agent may come later); ``.out`` is read non-blocking.
        """
        try:
            rfd = os.open(ctl_base + ".out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            wfd = os.open(ctl_base + ".in", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as exc:
            raise VmtraceError("cannot open control FIFOs %s.{in,out}: %s" % (ctl_base, exc.strerror)) from None
        return cls(name, rfd, wfd, "fifo")

    @classmethod
    def from_socket(cls, name: str, sock: socket.socket) -> "AgentLink":
        sock.setblocking(False)
        fd = sock.detach()
        return cls(name, fd, fd, "socket")

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.wfd = None

    # -- sending ---------------------------------------------------------------------------
    def _write(self, data: bytes, timeout: float = 2.0) -> bool:
        if self.wfd is None:
            return False
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        while view:
            try:
                view = view[os.write(self.wfd, view):]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    self.eof = True
                    return False
                raise VmtraceError("%s: control write failed: %s" % (self.name, exc.strerror)) from None
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            select.select([], [self.wfd], [], min(left, 0.2))
        return True

    def order(self, start: bool) -> bool:
        """The seed's plain order: ``1`` starts, ``0`` stops."""
        return self._write(protocol.PLAIN_START if start else protocol.PLAIN_STOP)

    def send(self, name: str, **fields: Any) -> Any:
        """Send a request; return its id (to wait for with :meth:`wait`)."""
        self._seq += 1
        rid = self._seq
        if not self._write(protocol.encode(protocol.msg(name, id=rid, **fields))):
            return None
        return rid

    # -- receiving ---------------------------------------------------------------------------
    def pump(self, timeout: float = 0.0) -> None:
        """Read what the agent sent (waiting at most ``timeout``) and file the replies."""
        if self.rfd is None or self.eof:
            if timeout:
                time.sleep(timeout)
            return
        try:
            ready = select.select([self.rfd], [], [], timeout)[0]
        except (OSError, ValueError):
            self.eof = True
            return
        while ready:
            try:
                data = os.read(self.rfd, 1 << 20)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EIO):
                    self.eof = True
                break
            if not data:
                # A FIFO reads EOF before its first writer too; only a writer that came
                # and went (or a socket) means the agent is gone.
                if self.kind == "socket" or self._seen_writer:
                    self.eof = True
                elif timeout:
                    time.sleep(min(timeout, 0.05))
                break
            self._seen_writer = True
            self.last_rx = time.monotonic()
            for item in self.decoder.feed(data):
                if isinstance(item, protocol.ProtocolError):
                    self.garbage += 1
                    if len(self.errors) < 20:
                        self.errors.append(str(item))
                elif isinstance(item, protocol.Message):
                    key = item.get("id")
                    if key is not None and not isinstance(key, (dict, list)):
                        self.replies[key] = item
                        if len(self.replies) > 1024:  # a guest flooding replies: keep bounded
                            self.replies.pop(next(iter(self.replies)))
                    elif len(self.unsolicited) < 64:
                        self.unsolicited.append(item)

    def wait(self, rid: Any, timeout: float) -> Optional[protocol.Message]:
        """The reply to request ``rid``, or None if none came within ``timeout``."""
        if rid is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            if rid in self.replies:
                return self.replies.pop(rid)
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                return None
            self.pump(min(left, 0.1))

    def call(self, name: str, timeout: float = 5.0, **fields: Any) -> Optional[protocol.Message]:
        return self.wait(self.send(name, **fields), timeout)

    def call_idempotent(self, name: str, timeout: float, every: float = 5.0,
                        **fields: Any) -> Optional[protocol.Message]:
        """:meth:`call` for a request that may safely arrive twice, resent after ``every``
        quiet seconds until one reply comes or ``timeout`` runs out.

        A frame can be lost while a virtio-serial port's host side reconnects (the guest
        sees a late hang-up and voids what it had half read); a slow guest is also given
        the whole timeout, since any of the sent copies may be the one answered. While
        bytes are arriving (a large metadata reply crawling out of a starved TCG guest)
        nothing is resent: a second copy would only make the guest build it again.
        """
        deadline = time.monotonic() + timeout
        sent = []
        while True:
            rid = self.send(name, **fields)
            if rid is not None:
                sent.append(rid)
            step_end = min(deadline, time.monotonic() + every)
            while True:
                for r in sent:
                    if r in self.replies:
                        rep = self.replies.pop(r)
                        for other in sent:
                            self.replies.pop(other, None)
                        return rep
                now = time.monotonic()
                if now >= deadline or self.eof:
                    return None
                if now >= step_end:
                    if now - self.last_rx >= every:
                        break
                    step_end = min(deadline, self.last_rx + every)
                self.pump(min(0.1, max(0.0, step_end - now)))
