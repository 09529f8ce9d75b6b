"""An agent's ``-o`` stream read back: the frames (:mod:`vmtrace.protocol`) laid out as
a raw directory, which is what the readers take.

The stream interleaves CPUs in frames; the decoder wants one page sequence per CPU, so
the pages are streamed to a ``cpuN`` file each (memory stays bounded whatever the
input), metadata files are written through the raw-directory writer (names checked by
the one rule), and everything is treated as untrusted: sizes bounded before reading,
CPU numbers bounded, every problem a FormatError naming the file and the offset.
"""
from __future__ import annotations

import json
import os
from typing import Any, BinaryIO, Dict, Optional

from vmtrace import protocol
from vmtrace.errors import FormatError
from vmtrace.format.rawdir import write_metadata

STREAM_MAGIC = protocol.STREAM_MAGIC
MAX_CPU = protocol.STREAM_MAX_CPU


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
                    write_metadata(out_dir, files)
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
            write_metadata(out_dir, {"meta.json": json.dumps(meta, indent=1).encode()})
    return summary
