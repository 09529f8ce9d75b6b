"""The ``-o`` form: everything the host would get, as one byte stream on standard output.

The seed's ``-o`` wrote every CPU's raw pages to stdout interleaved, which nobody could
take apart again. Ours writes protocol frames (docs/protocol.md) after a fixed magic
line: ``metadata`` (the raw directory's files), ``pages`` chunks tagged with their CPU
(whole pages, moved by splice straight from the CPU's pipe), a second ``metadata`` at
the end (fresh saved_cmdlines and meta.json) and ``end`` with the final stats. A stream
without ``end`` was cut short; what it holds is still usable.

The stream's format is the protocol's (:mod:`vmtrace.protocol`: ``STREAM_MAGIC`` and
its frames); the host reads it with :func:`vmtrace.format.stream.unpack_stream`.
"""
from __future__ import annotations

import errno
import os
import select
import threading
from typing import Mapping

from vmtrace import protocol
from vmtrace.agent.pump import Sink
from vmtrace.agent.splice import SPLICE_F_MORE, SPLICE_F_MOVE, splice
from vmtrace.errors import FormatError

STREAM_MAGIC = protocol.STREAM_MAGIC


class StreamWriter:
    """Frames on one shared fd; a lock keeps each frame (header + pages) together."""

    def __init__(self, fd: int):
        self.fd = fd
        self.lock = threading.Lock()
        self._splice_ok = True
        self._write(STREAM_MAGIC)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.fd, view)
            except BlockingIOError:
                select.select([], [self.fd], [], 1.0)
                continue
            view = view[n:]

    def message(self, msg: protocol.Message) -> None:
        data = protocol.encode(msg)
        with self.lock:
            self._write(data)

    def pages(self, cpu: int, pipe_r: int, n: int) -> int:
        with self.lock:
            self._write(protocol.header(protocol.PAGES, {"cpu": cpu}, n))
            left = n
            while left:
                if self._splice_ok:
                    try:
                        m = splice(pipe_r, self.fd, left, SPLICE_F_MOVE | SPLICE_F_MORE)
                    except BlockingIOError:
                        select.select([], [self.fd], [], 1.0)
                        continue
                    except OSError as exc:
                        # a terminal, or a file opened O_APPEND (>>): splice refuses; copy
                        if exc.errno != errno.EINVAL:
                            raise
                        self._splice_ok = False
                        continue
                    if m <= 0:
                        raise OSError(errno.EIO, "splice to stdout moved nothing")
                    left -= m
                else:
                    try:
                        chunk = os.read(pipe_r, min(left, 1 << 16))
                    except BlockingIOError:
                        raise OSError(errno.EIO, "pipe emptied while copying pages") from None
                    self._write(chunk)
                    left -= len(chunk)
        return n


class StreamSink(Sink):
    """A pump's sink in ``-o`` mode: always takes everything it is offered."""

    def __init__(self, writer: StreamWriter, cpu: int):
        self.writer, self.cpu, self.name = writer, cpu, "stdout"

    def send(self, pipe_r: int, n: int) -> int:
        return self.writer.pages(self.cpu, pipe_r, n)


def write_metadata_dir(out_dir: str, files: Mapping[str, bytes]) -> None:
    """Write metadata files (names already validated) under out_dir/metadata/."""
    base = os.path.join(out_dir, "metadata")
    for name, data in files.items():
        if not protocol.metadata_name_ok(name):
            raise FormatError("metadata name %r not allowed" % name[:80])
        path = os.path.join(base, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
