"""The agent's side of the control port: plain seed orders and the framed protocol.

Nothing the host sends may crash or wedge the agent: every request is answered (frames
with ``ok``/``error``), malformed input is reported and skipped, handler failures of any
kind become ``error`` replies, and replies are written with a deadline so a host that
asks but never reads cannot hang the agent. The deadline counts from the last byte the
host took, not from the start: a multi-megabyte metadata reply through a starved TCG
guest's port can take longer than any fixed total while still moving.
"""
from __future__ import annotations

import errno
import os
import select
import sys
import time
from typing import TYPE_CHECKING, Any, Callable, Dict, Optional

from vmtrace import protocol
from vmtrace.errors import VmtraceError

if TYPE_CHECKING:  # pragma: no cover
    from vmtrace.agent.core import Agent

REPLY_IDLE_TIMEOUT = 30.0
READ_CHUNK = 1 << 16


class ControlChannel:
    """The control port: one fd to read orders from, and somewhere to send replies.

    Sockets and virtio ports are bidirectional. A FIFO only carries host -> agent; its
    replies go to a second FIFO ``agent-ctl-path.out`` if the directory has one (the name
    QEMU's pipe chardev gives the host's reading end), and are dropped otherwise.
    """

    def __init__(self, fd: int, kind: str, reply_path: Optional[str] = None):
        self.fd = fd
        self.kind = kind
        self.reply_path = reply_path
        self._reply_fd: Optional[int] = fd if kind in ("socket", "virtio") else None
        self.eof = False

    def read(self) -> bytes:
        try:
            data = os.read(self.fd, READ_CHUNK)
        except BlockingIOError:
            return b""
        except OSError as exc:
            if exc.errno in (errno.ECONNRESET, errno.EIO, errno.ENODEV):
                self.eof = True
                return b""
            raise
        if not data:
            self.eof = True
        return data

    def _reply_target(self) -> Optional[int]:
        if self._reply_fd is not None:
            return self._reply_fd
        if not self.reply_path or not os.path.exists(self.reply_path):
            return None
        try:
            self._reply_fd = os.open(self.reply_path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return None  # no reader on the reply FIFO
        return self._reply_fd

    def send(self, data: bytes, idle_timeout: float = REPLY_IDLE_TIMEOUT) -> bool:
        fd = self._reply_target()
        if fd is None:
            return False
        view = memoryview(data)
        deadline = time.monotonic() + idle_timeout
        while view:
            try:
                n = os.write(fd, view)
                view = view[n:]
                deadline = time.monotonic() + idle_timeout
                continue
            except BlockingIOError:
                pass
            except OSError as exc:
                print("vmtrace-agent: control reply failed: %s" % exc.strerror, file=sys.stderr)
                if fd != self.fd:
                    os.close(fd)
                    self._reply_fd = None
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                print("vmtrace-agent: host took nothing of a %d-byte reply for %.0fs; dropped the "
                      "last %d bytes" % (len(data), idle_timeout, len(view)), file=sys.stderr)
                return False
            select.select([], [fd], [], min(left, 0.5))
        return True

    def close(self) -> None:
        for fd in {self.fd, self._reply_fd}:
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass


class Controller:
    """Turns control-port bytes into agent actions and replies."""

    def __init__(self, agent: "Agent", channel: ControlChannel):
        self.agent = agent
        self.channel = channel
        self.decoder = protocol.Decoder(allow_orders=True, source="control port")
        self.framed = False  # the host has spoken the framed protocol at least once
        self.recv_clock: Optional[Dict[str, Any]] = None
        self.handlers: Dict[int, Callable[[protocol.Message], protocol.Message]] = {
            protocol.HELLO: self._hello,
            protocol.CONFIGURE: self._configure,
            protocol.METADATA: self._metadata,
            protocol.START: self._start,
            protocol.STOP: self._stop,
            protocol.STATS: self._stats,
            protocol.TIME_PROBE: self._time_probe,
            protocol.BYE: self._bye,
        }

    def reset(self) -> None:
        """The host went away: forget its half-sent frame and whether it spoke frames."""
        self.decoder = protocol.Decoder(allow_orders=True, source="control port")
        self.framed = False

    def on_readable(self) -> None:
        data = self.channel.read()
        # Read the guest clock right at receipt: a time probe is answered with this
        # reading, not with the time after decoding and dispatching.
        self.recv_clock = self.agent.read_clock()
        if data:
            self.feed(data)

    def feed(self, data: bytes) -> None:
        for item in self.decoder.feed(data):
            self.handle(item)

    def handle(self, item: "protocol.Item") -> None:
        if isinstance(item, protocol.Order):
            try:
                self.agent.start() if item.start else self.agent.stop()
            except VmtraceError as exc:
                print("vmtrace-agent: order %s failed: %s" % ("1" if item.start else "0", exc), file=sys.stderr)
            return
        if isinstance(item, protocol.ProtocolError):
            print("vmtrace-agent: invalid host notification: %s" % item, file=sys.stderr)
            if self.framed:
                self._reply(protocol.msg("error", re=None, message=str(item)))
            return
        self.framed = True
        self._reply(self.dispatch(item))

    def dispatch(self, msg: protocol.Message) -> protocol.Message:
        handler = self.handlers.get(msg.type)
        try:
            if handler is None:
                raise protocol.ProtocolError("%s is not a request the agent takes" % msg.name)
            reply = handler(msg)
        except VmtraceError as exc:
            reply = protocol.msg("error", re=msg.name, message=str(exc))
        except Exception as exc:  # noqa: BLE001 - the host must never crash the agent
            reply = protocol.msg("error", re=msg.name, message="%s: %s" % (type(exc).__name__, exc))
        if "id" in msg.fields:
            reply.fields["id"] = msg.fields["id"]
        return reply

    def _reply(self, msg: protocol.Message) -> None:
        try:
            data = protocol.encode(msg)
        except protocol.ProtocolError as exc:
            data = protocol.encode(protocol.msg("error", re=msg.name, message=str(exc)))
        self.channel.send(data)

    # -- handlers --------------------------------------------------------------------
    def _hello(self, msg: protocol.Message) -> protocol.Message:
        version = protocol.require(msg, "version", int, optional=True)
        if version is not None and version < 1:
            raise protocol.ProtocolError("hello: protocol version %d not supported" % version)
        return protocol.Message(protocol.HELLO, self.agent.hello_fields())

    def _configure(self, msg: protocol.Message) -> protocol.Message:
        self.agent.configure(msg.fields)
        return protocol.msg("ok", re="configure")

    def _metadata(self, msg: protocol.Message) -> protocol.Message:
        want_kallsyms = protocol.require(msg, "kallsyms", bool, optional=True)
        files = self.agent.metadata_files(with_kallsyms=want_kallsyms is not False)
        return protocol.pack_files(files)

    def _start(self, msg: protocol.Message) -> protocol.Message:
        self.agent.start(mark=_order_mark("start", msg))
        return protocol.msg("ok", re="start")

    def _stop(self, msg: protocol.Message) -> protocol.Message:
        self.agent.stop(mark=_order_mark("stop", msg))
        return protocol.msg("ok", re="stop", stats=self.agent.stats())

    def _stats(self, msg: protocol.Message) -> protocol.Message:
        return protocol.Message(protocol.STATS, self.agent.stats_fields())

    def _time_probe(self, msg: protocol.Message) -> protocol.Message:
        seq = protocol.require(msg, "seq", int, optional=True)
        fields: Dict[str, Any] = self.agent.time_probe(seq, self.recv_clock)
        for key, value in msg.fields.items():
            fields.setdefault(key, value)
        return protocol.Message(protocol.TIME_PROBE, fields)

    def _bye(self, msg: protocol.Message) -> protocol.Message:
        self.agent.stop()
        self.agent.request_exit("bye")
        return protocol.msg("bye", stats=self.agent.stats())


def _order_mark(kind: str, msg: protocol.Message) -> str:
    """The trace_marker line for a framed start/stop: ``vmtrace-order kind=K seq=N``.
    It lands inside the order's round trip, so the host can check the order on the
    merged timeline like a time probe (vmtrace check)."""
    seq = protocol.require(msg, "seq", int, optional=True)
    return "vmtrace-order kind=%s%s\n" % (kind, "" if seq is None else " seq=%d" % seq)
