"""The ``-o`` form: everything the host would get, as one byte stream on standard output.

The seed's ``-o`` wrote every CPU's raw pages to stdout interleaved, which nobody could
take apart again. Ours writes protocol frames (docs/protocol.md) after a fixed magic
line: ``metadata`` (the raw directory's files), ``pages`` chunks tagged with their CPU
(whole pages, moved by splice straight from the CPU's pipe), a second ``metadata`` at
the end (fresh saved_cmdlines and meta.json) and ``end`` with the final stats. A stream
without ``end`` was cut short; what it holds is still usable.

``unpack_stream`` turns a stream into the raw directory layout, which is what
``vmtrace report`` reads. It streams the page chunks to disk, so memory stays bounded
whatever the input size, and it treats the input as untrusted.
"""
from __future__ import annotations

import errno
import json
import os
import select
import threading
from typing import Any, BinaryIO, Dict, Mapping, Optional

from vmtrace import protocol
from vmtrace.agent.pump import Sink
from vmtrace.agent.splice import SPLICE_F_MORE, SPLICE_F_MOVE, splice
from vmtrace.errors import FormatError

STREAM_MAGIC = b"VMTRACE-STREAM 1\n"
MAX_CPU = 4096


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
        if not protocol.METADATA_NAME.match(name):
            raise FormatError("metadata name %r not allowed" % name[:80])
        path = os.path.join(base, *name.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    return data if data is not None else b""


def unpack_stream(stream_path: str, out_dir: str) -> Dict[str, Any]:
    """Convert an ``-o`` stream file into the raw directory layout at ``out_dir``.

    Returns a summary: ``{"complete": bool, "cpus": {cpu: bytes}, "frames": n}``.
    Raises FormatError (naming the file and offset) on anything that is not a stream.
    """
    os.makedirs(out_dir, exist_ok=True)
    outs: Dict[int, BinaryIO] = {}
    summary: Dict[str, Any] = {"complete": False, "cpus": {}, "frames": 0}
    end_stats: Optional[Dict[str, Any]] = None
    meta_json: Optional[bytes] = None
    try:
        with open(stream_path, "rb") as f:
            magic = _read_exact(f, len(STREAM_MAGIC))
            if magic != STREAM_MAGIC:
                raise FormatError("not a vmtrace -o stream (bad magic)", source=stream_path, offset=0)
            while True:
                off = f.tell()
                head = _read_exact(f, protocol.HEADER_SIZE)
                if not head:
                    break
                if len(head) < protocol.HEADER_SIZE:
                    raise FormatError("truncated frame header", source=stream_path, offset=off)
                magic4, version, mtype, _flags, jlen, blen = protocol.HEADER.unpack(head)
                if magic4 != protocol.MAGIC:
                    raise FormatError("frame magic missing", source=stream_path, offset=off)
                if version != protocol.VERSION:
                    raise FormatError("unsupported frame version %d" % version, source=stream_path, offset=off)
                if jlen > protocol.MAX_JSON or blen > protocol.MAX_BLOB:
                    raise FormatError("frame too large (json %d, blob %d)" % (jlen, blen), source=stream_path, offset=off)
                body = _read_exact(f, jlen)
                if len(body) < jlen:
                    raise FormatError("truncated frame", source=stream_path, offset=off)
                try:
                    fields = json.loads(body.decode("utf-8"))
                except (UnicodeDecodeError, ValueError, RecursionError):
                    raise FormatError("frame JSON does not parse", source=stream_path, offset=off) from None
                if not isinstance(fields, dict):
                    raise FormatError("frame JSON is not an object", source=stream_path, offset=off)
                summary["frames"] += 1
                if mtype == protocol.PAGES:
                    cpu = fields.get("cpu")
                    if not isinstance(cpu, int) or isinstance(cpu, bool) or not 0 <= cpu < MAX_CPU:
                        raise FormatError("pages frame with bad cpu %r" % (cpu,), source=stream_path, offset=off)
                    out = outs.get(cpu)
                    if out is None:
                        out = outs[cpu] = open(os.path.join(out_dir, "cpu%d" % cpu), "wb")
                    left = blen
                    while left:
                        chunk = f.read(min(left, 1 << 20))
                        if not chunk:
                            raise FormatError("truncated pages frame", source=stream_path, offset=off)
                        out.write(chunk)
                        left -= len(chunk)
                    summary["cpus"][cpu] = summary["cpus"].get(cpu, 0) + blen
                    continue
                blob = _read_exact(f, blen)
                if len(blob) < blen:
                    raise FormatError("truncated frame", source=stream_path, offset=off)
                msg = protocol.Message(mtype, fields, blob) if mtype in protocol.NAMES else None
                if msg is None:
                    raise FormatError("unknown frame type %d" % mtype, source=stream_path, offset=off)
                if mtype == protocol.METADATA:
                    try:
                        files = protocol.unpack_files(msg)
                    except FormatError as exc:
                        raise FormatError(exc.what, source=stream_path, offset=off) from None
                    if "meta.json" in files:
                        meta_json = files["meta.json"]
                    write_metadata_dir(out_dir, files)
                elif mtype == protocol.END:
                    stats = fields.get("stats")
                    end_stats = stats if isinstance(stats, dict) else {}
                    summary["complete"] = True
    finally:
        for out in outs.values():
            out.close()
    if end_stats is not None and meta_json is not None:
        try:
            meta = json.loads(meta_json.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            meta = None
        if isinstance(meta, dict):
            meta["stats"] = end_stats
            write_metadata_dir(out_dir, {"meta.json": json.dumps(meta, indent=1).encode()})
    return summary
