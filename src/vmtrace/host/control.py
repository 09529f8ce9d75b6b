"""The host's end of one guest's control port: requests, replies, and plain seed orders.

Everything here is non-blocking with deadlines, because a guest can stop answering at
any moment (killed agent, paused VM) and the recorder must keep serving the others.
And everything here is bounded in bytes, because a guest can also answer far too much:

* only replies to requests still awaited are kept (matched by ``id``), and in total at
  most MAX_KEPT_BYTES of them besides the one blob a metadata request expects; a blob
  on any other frame is skipped as it arrives, never buffered (protocol.Decoder);
* a guest gets one turn's share of reading (TURN_BYTES, TURN_S) per :meth:`pump`, so
  a flood on one port cannot starve the time probes, the duration or Ctrl-C of the
  others;
* traffic that is neither a reply nor a late reply to one of our requests is *junk*;
  past MAX_JUNK_BYTES or MAX_JUNK_ITEMS :meth:`misbehaviour` says so and the session
  ends that guest's recording;
* requests wait in a bounded queue for a guest that does not read its port, so the
  recorder never blocks writing to a guest.
"""
from __future__ import annotations

import errno
import os
import select
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional

from vmtrace import protocol
from vmtrace.errors import VmtraceError

READ_CHUNK = 64 << 10      # one read(); a turn's share is a few of them
TURN_BYTES = 256 << 10     # the most read from one guest's control port per pump()...
TURN_S = 0.01              # ...and the most time spent reading and decoding it, beyond one frame's parse
MAX_OUTSTANDING = 256      # requests awaiting a reply; older ones are given up (the loop has <= 70)
MAX_KEPT_BYTES = 4 << 20   # replies received and not yet taken, the expected metadata blob aside
MAX_JUNK_BYTES = 64 << 20  # unsolicited, malformed or refused bytes before the guest is cut off
MAX_JUNK_ITEMS = 4096      # ...or that many malformed frames and unsolicited messages (a real agent sends none)
MAX_QUEUED = 256 << 10     # requests queued for a guest that does not read its port (a request is < 200 bytes)
MAX_ERRORS_KEPT = 8        # texts of malformed frames kept for the guest's problems
# The largest reply JSON taken: a metadata index of MAX_METADATA_FILES names is ~400 KB,
# a stats reply for 1024 CPUs ~250 KB. Half the protocol's limit halves the worst
# single parse a guest can make the loop do (~40 ms here for 512 KiB of integers).
MAX_REPLY_JSON = 512 << 10


class AgentLink:
    """A control channel: ``wfd`` carries host -> agent, ``rfd`` agent -> host.

    Made by a transport (:mod:`vmtrace.host.transport`), which knows what an end of
    file on ``rfd`` means: with ``eof_before_writer`` (FIFOs) an empty read before the
    first bytes is the agent not there yet, not the agent gone.
    """

    def __init__(self, name: str, rfd: Optional[int], wfd: Optional[int], *, eof_before_writer: bool):
        self.name = name
        self.rfd = rfd
        self.wfd = wfd
        self.eof_before_writer = eof_before_writer
        self.decoder = protocol.Decoder(allow_orders=False, source="%s control" % name, keep_blob=self._keep_blob,
                                        max_json=MAX_REPLY_JSON)
        # id -> blob bytes its reply may carry, oldest first
        self.outstanding: "OrderedDict[int, int]" = OrderedDict()
        self.forgotten: "OrderedDict[int, None]" = OrderedDict()  # given up on: one late reply each is fine
        self.replies: Dict[int, protocol.Message] = {}
        self.arrived_ns: Dict[int, int] = {}  # CLOCK_MONOTONIC right after the read that completed a reply
        self.kept_bytes = 0
        self.received = 0      # bytes read from the port
        self.useful = 0        # bytes of replies and late replies
        self.unsolicited = 0   # messages nobody asked for (or over the kept-bytes cap)
        self.late = 0          # replies to requests given up on
        self.not_sent = 0      # requests dropped because the guest did not read its port
        self.errors: List[str] = []
        self.last_error = ""   # the latest malformed frame's text (errors keeps the first ones)
        self.eof = False
        self._seq = 0
        self._queue = bytearray()
        self._seen_writer = False
        self.last_rx = 0.0  # time.monotonic() of the last bytes read from the agent

    def close(self) -> None:
        for fd in {self.rfd, self.wfd}:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self.rfd = self.wfd = None

    # -- sending ---------------------------------------------------------------------------
    @property
    def queued(self) -> int:
        """Request bytes not yet taken by the guest."""
        return len(self._queue)

    def flush(self, timeout: float = 0.0) -> bool:
        """Write queued requests, waiting at most ``timeout`` for room; True when all went."""
        deadline = time.monotonic() + timeout
        while self._queue:
            if self.wfd is None:
                return False
            try:
                n = os.write(self.wfd, self._queue)
                del self._queue[:n]
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                if exc.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN):
                    self.eof = True
                    self._queue.clear()
                    return False
                raise VmtraceError("%s: control write failed: %s" % (self.name, exc.strerror)) from None
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            _wait(self.wfd, select.POLLOUT, min(left, 0.2))
        return True

    def _enqueue(self, data: bytes) -> bool:
        if self.wfd is None or self.eof:
            return False
        if len(self._queue) + len(data) > MAX_QUEUED:
            self.not_sent += 1
            return False
        self._queue += data
        self.flush(0)
        return True

    def queue_order(self, start: bool) -> bool:
        """Queue the seed's plain order (``1`` starts, ``0`` stops); :attr:`queued` says
        when the guest has taken it."""
        return self._enqueue(protocol.PLAIN_START if start else protocol.PLAIN_STOP)

    def order(self, start: bool) -> bool:
        """The seed's plain order, waiting up to 2 s for the guest to take it."""
        return self.queue_order(start) and self.flush(2.0)

    def send(self, name: str, blob_cap: int = 0, **fields: Any) -> Optional[int]:
        """Queue a request; return its id (None if it could not be queued).

        ``blob_cap``: the blob size its reply may carry (metadata); any other reply's
        blob is skipped unread.
        """
        rid = self._seq + 1
        if not self._enqueue(protocol.encode(protocol.msg(name, id=rid, **fields))):
            return None
        self._seq = rid
        self.outstanding[rid] = blob_cap
        while len(self.outstanding) > MAX_OUTSTANDING:
            self.forget(next(iter(self.outstanding)))
        return rid

    # -- receiving ---------------------------------------------------------------------------
    def _keep_blob(self, mtype: int, fields: Dict[str, Any], blen: int) -> bool:
        rid = fields.get("id")
        return type(rid) is int and blen <= self.outstanding.get(rid, 0)

    def pump(self, timeout: float = 0.0) -> bool:
        """Read one turn's share of what the agent sent (waiting at most ``timeout`` for
        it) and file the replies. True if the share ran out with more maybe waiting."""
        if self.rfd is None or self.eof:
            if timeout:
                time.sleep(timeout)
            return False
        if timeout and not _wait(self.rfd, select.POLLIN, timeout):
            return False
        t_end = time.monotonic() + TURN_S
        got = 0
        while got < TURN_BYTES:
            try:
                data = os.read(self.rfd, min(READ_CHUNK, TURN_BYTES - got))
            except BlockingIOError:
                return False
            except OSError as exc:
                if exc.errno in (errno.ECONNRESET, errno.EIO, errno.EBADF):
                    self.eof = True
                return False
            if not data:
                # A FIFO reads EOF before its first writer too; only a writer that came
                # and went (or a socket) means the agent is gone.
                if not self.eof_before_writer or self._seen_writer:
                    self.eof = True
                elif timeout:
                    time.sleep(min(timeout, 0.05))
                return False
            self._seen_writer = True
            self.last_rx = time.monotonic()
            now_ns = time.monotonic_ns()
            got += len(data)
            self.received += len(data)
            for item in self.decoder.feed(data):
                if isinstance(item, protocol.Message):
                    self._file(item, now_ns)
                elif isinstance(item, protocol.ProtocolError):
                    self.last_error = str(item)
                    if len(self.errors) < MAX_ERRORS_KEPT:
                        self.errors.append(self.last_error)
            if time.monotonic() >= t_end:
                break
        return True

    def _file(self, msg: protocol.Message, now_ns: int) -> None:
        rid = msg.get("id")
        if type(rid) is int and rid in self.outstanding:
            cost = msg.size - msg.blob_dropped
            if self.kept_bytes + cost <= MAX_KEPT_BYTES + self.outstanding[rid]:
                del self.outstanding[rid]
                self.replies[rid] = msg
                self.arrived_ns[rid] = now_ns
                self.kept_bytes += cost
                self.useful += msg.size
                return
        elif type(rid) is int and rid in self.forgotten:
            del self.forgotten[rid]
            self.late += 1
            self.useful += msg.size
            return
        self.unsolicited += 1

    def take(self, rid: Optional[int]) -> Optional[protocol.Message]:
        """The reply to ``rid`` if it has come (it is then no longer kept)."""
        rep = self.replies.pop(rid, None) if rid is not None else None
        if rep is not None:
            self.kept_bytes -= rep.size - rep.blob_dropped
            self.arrived_ns.pop(rid, None)
        return rep

    def forget(self, rid: Optional[int]) -> None:
        """Give up on ``rid``: a reply still to come is late, not junk; one already here
        is dropped."""
        if rid is None:
            return
        if rid in self.outstanding:
            del self.outstanding[rid]
            self.forgotten[rid] = None
            while len(self.forgotten) > MAX_OUTSTANDING:
                self.forgotten.popitem(last=False)
        self.take(rid)

    @property
    def junk(self) -> int:
        """Bytes read that were neither a reply nor a late reply (nor a frame still arriving)."""
        return self.received - self.useful - self.decoder.pending

    def misbehaviour(self) -> Optional[str]:
        """Why this guest's control traffic is over its bounds, or None."""
        if self.junk > MAX_JUNK_BYTES:
            return ("control port flooded: %d MiB of unsolicited or malformed traffic (limit %d MiB)"
                    % (self.junk >> 20, MAX_JUNK_BYTES >> 20))
        items = self.decoder.errors + self.unsolicited
        if items > MAX_JUNK_ITEMS:
            return ("control port flooded: %d malformed frames and unsolicited messages (limit %d)"
                    % (items, MAX_JUNK_ITEMS))
        return None

    def describe_errors(self) -> str:
        """What was wrong with this guest's traffic so far, for a problem line; or ""."""
        parts = []
        if self.decoder.errors:
            parts.append("%d malformed frame%s (first: %s)" % (
                self.decoder.errors, "" if self.decoder.errors == 1 else "s", self.errors[0] if self.errors else "?"))
        if self.unsolicited:
            parts.append("%d unsolicited message%s" % (self.unsolicited, "" if self.unsolicited == 1 else "s"))
        if self.not_sent:
            parts.append("%d request%s not sent: the guest does not read its control port" % (
                self.not_sent, "" if self.not_sent == 1 else "s"))
        return "; ".join(parts)

    # -- blocking helpers (tests, tools, the end of a recording) ----------------------------
    def wait(self, rid: Any, timeout: float) -> Optional[protocol.Message]:
        """The reply to request ``rid``, or None if none came within ``timeout``."""
        if rid is None:
            return None
        deadline = time.monotonic() + timeout
        while True:
            rep = self.take(rid)
            if rep is not None:
                return rep
            left = deadline - time.monotonic()
            if left <= 0 or self.eof:
                self.forget(rid)
                return None
            self.flush(0)
            self.pump(min(left, 0.1))

    def call(self, name: str, timeout: float = 5.0, **fields: Any) -> Optional[protocol.Message]:
        return self.wait(self.send(name, **fields), timeout)

    def call_idempotent(self, name: str, timeout: float, every: float = 5.0, blob_cap: int = 0,
                        **fields: Any) -> Optional[protocol.Message]:
        """:meth:`call` for a request that may safely arrive twice, resent after ``every``
        quiet seconds until one reply comes or ``timeout`` runs out (see :class:`Request`)."""
        req = Request(self, name, timeout, every=every, blob_cap=blob_cap, **fields)
        while not req.poll():
            self.flush(0)
            self.pump(min(0.1, req.quiet_for()))
        return req.reply


# The message types a request's reply can have. A malformed frame of one of these types
# arriving while the request waits is taken as its (unusable) reply: a real agent never
# sends one, so waiting on for the ceiling would only let a hostile guest hold its
# setup, and with it the start of everyone's --duration, for minutes.
REPLY_TYPES = {
    "hello": (protocol.HELLO, protocol.ERROR), "configure": (protocol.OK, protocol.ERROR),
    "metadata": (protocol.METADATA, protocol.ERROR), "start": (protocol.OK, protocol.ERROR),
    "stop": (protocol.OK, protocol.ERROR), "stats": (protocol.STATS, protocol.ERROR),
    "time_probe": (protocol.TIME_PROBE, protocol.ERROR), "bye": (protocol.BYE, protocol.ERROR),
}


class Request:
    """One request from sending until its reply comes or its time runs out.

    Non-blocking: :meth:`poll` looks, the caller pumps the link in between (the session
    does so for all guests in one loop). With ``every``, the request is idempotent and
    resent after ``every`` quiet seconds: a frame can be lost while a virtio-serial
    port's host side reconnects (the guest sees a late hang-up and voids what it had
    half read), and a slow guest is given the whole timeout, since any of the sent copies
    may be the one answered. While bytes are arriving (a large metadata reply crawling
    out of a starved TCG guest) nothing is resent: a second copy would only make the
    guest build it again.
    """

    def __init__(self, link: AgentLink, name: str, timeout: float, every: Optional[float] = None,
                 blob_cap: int = 0, **fields: Any):
        self.link = link
        self.name = name
        self.fields = fields
        self.blob_cap = blob_cap
        self.every = every
        self.deadline = time.monotonic() + timeout
        self.sent: List[int] = []
        self.reply: Optional[protocol.Message] = None
        self.arrived_ns = 0
        self.done = False
        self.malformed = False  # ended by a malformed frame of a reply's type
        self._types = REPLY_TYPES.get(name, ())
        self._bad0 = self._bad_count()
        self._send()

    def _bad_count(self) -> int:
        bad = self.link.decoder.bad_frames
        return sum(bad.get(t, 0) for t in self._types)

    def _send(self) -> None:
        rid = self.link.send(self.name, blob_cap=self.blob_cap, **self.fields)
        if rid is not None:
            self.sent.append(rid)
        now = time.monotonic()
        self.step_end = min(self.deadline, now + self.every) if self.every else self.deadline

    def quiet_for(self) -> float:
        """How long nothing needs doing for this request."""
        return max(0.0, min(self.step_end, self.deadline) - time.monotonic())

    def poll(self) -> bool:
        """True once finished: ``reply`` is the answer, or None when none came in time."""
        if self.done:
            return True
        link = self.link
        for rid in self.sent:
            if rid in link.replies:
                self.arrived_ns = link.arrived_ns.get(rid, 0)
                self.reply = link.take(rid)
                return self._finish()
        if self._bad_count() != self._bad0:
            self.malformed = True
            return self._finish()
        now = time.monotonic()
        if now >= self.deadline or link.eof or link.rfd is None:
            return self._finish()
        if self.every and now >= self.step_end:
            if now - link.last_rx >= self.every:
                self._send()
            else:
                self.step_end = min(self.deadline, link.last_rx + self.every)
        return False

    def _finish(self) -> bool:
        for rid in self.sent:
            self.link.forget(rid)
        self.done = True
        return True


def _wait(fd: int, event: int, timeout: float) -> bool:
    """poll(2) one descriptor: select() cannot take descriptors past 1023, which a
    recording of many guests with many CPUs reaches."""
    p = select.poll()
    p.register(fd, event)
    try:
        return bool(p.poll(max(0.0, timeout) * 1000.0))
    except OSError:
        return False
