"""Opening any recorded input as a TraceSource, so the decoder never asks what it is.

A trace.dat (v6 or v7, from trace-cmd or from our recorder) and a raw directory (agent
output or recorder spool) give the same interface: metadata blobs, decoded options and
per-buffer, per-CPU page streams. The kind is decided by content (magic bytes, the
``metadata/`` directory), never by file name.
"""
from __future__ import annotations

import os
import re
import stat
from typing import Optional

from vmtrace.errors import FormatError
from vmtrace.format import Buffer, CpuData, TraceSource

__all__ = ["open_source", "source_metadata", "TraceSource", "Buffer", "CpuData"]

_NAME_LINE = re.compile(rb"^name:\s*(\S+)", re.M)


def open_source(path: str | os.PathLike) -> TraceSource:
    """A trace.dat file or a raw directory as a TraceSource; FormatError otherwise."""
    p = os.fspath(path)
    if os.path.isdir(p):
        from vmtrace.format.rawdir import RawDir, is_rawdir
        if not is_rawdir(p):
            raise FormatError("directory is not a raw trace directory (no metadata/)", source=p)
        return RawDir(p)
    try:
        if os.path.exists(p) and not stat.S_ISREG(os.stat(p).st_mode):
            # a FIFO or device would block or never end; streams have their own reader
            raise FormatError("not a regular file or directory", source=p)
        with open(p, "rb") as f:
            head = f.read(32)
    except OSError as e:
        raise FormatError(f"cannot open: {e.strerror}", source=p) from None
    if head.startswith(b"VMTRACE-STREAM "):
        from vmtrace.protocol import STREAM_MAGIC
        if head.startswith(STREAM_MAGIC):
            return _open_stream(p)
        raise FormatError("unsupported vmtrace -o stream version", source=p, offset=0)
    head = head[:10]
    from vmtrace.format.tracedat_read import MAGIC, TraceDat
    if head != MAGIC:
        raise FormatError("neither a trace.dat file (bad magic) nor a raw directory",
                          source=p, offset=0)
    return TraceDat(p)


def _open_stream(path: str) -> TraceSource:
    """An agent's ``-o`` stream, unpacked into a private raw directory.

    The stream interleaves CPUs in frames; the decoder wants one page sequence per CPU,
    so it is laid out as a raw directory first (same size as the stream) and that
    directory is removed when the source is closed.
    """
    import shutil
    import tempfile

    from vmtrace.format.rawdir import RawDir
    from vmtrace.format.stream import MAX_CPU as STREAM_MAX_CPU, unpack_stream

    tmp = tempfile.mkdtemp(prefix="vmtrace-stream-")
    try:
        _descriptors_for(STREAM_MAX_CPU + _FD_HEADROOM)
        try:
            unpack_stream(path, tmp)
        except OSError as e:
            # unpack_stream keeps one file open per CPU of the stream (up to its 4096)
            raise FormatError(f"cannot unpack the stream: {e.strerror}", source=path) from None
        src = RawDir(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    src.path = path
    src.kind = "stream"
    close = src.close

    def close_and_remove() -> None:
        try:
            close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    src.close = close_and_remove  # type: ignore[method-assign]
    return src


# Descriptors the process needs besides one per CPU of an unpacked stream.
_FD_HEADROOM = 64


def _descriptors_for(n: int) -> None:
    """Raise the soft RLIMIT_NOFILE to ``n`` when the hard limit allows.

    An ``-o`` stream may name up to 4096 CPUs and the unpacker holds a file per CPU;
    with the usual soft limit of 1024 a stream of 2000 CPUs failed with EMFILE.
    """
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n:
        want = n if hard == resource.RLIM_INFINITY else min(n, hard)
        if want > soft:
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


def _event_name(text: bytes) -> Optional[str]:
    m = _NAME_LINE.search(text)
    return m.group(1).decode("ascii", "replace") if m else None


def source_metadata(src: TraceSource) -> dict[str, bytes]:
    """The source's metadata under raw-directory names (the writer's input).

    Lets any input be re-written as a trace.dat or a raw directory. Ftrace's internal
    formats go under ``events/ftrace/NAME/format``, as they sit in tracefs.
    """
    md: dict[str, bytes] = {"header_page": src.header_page, "header_event": src.header_event}
    if src.cmdlines:
        md["saved_cmdlines"] = src.cmdlines
    if src.printk_formats:
        md["printk_formats"] = src.printk_formats
    if src.kallsyms:
        md["kallsyms"] = src.kallsyms
    for i, text in enumerate(src.ftrace_formats):
        md[f"events/ftrace/{_event_name(text) or f'unnamed{i}'}/format"] = text
    for i, (system, text) in enumerate(src.event_formats):
        md[f"events/{system}/{_event_name(text) or f'unnamed{i}'}/format"] = text
    return md
