"""Understanding ftrace bytes: the trace.dat container, ring-buffer pages, event formats.

This package is pure (bytes in, structures out) and this file stays import-light: it
holds only the source data model that every input kind shares, so that ``vmtrace agent``
and the CLI can import it without numpy or a codec library.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Union

ChunkBuffer = Union[bytes, bytearray, memoryview]


class CpuData:
    """The ring-buffer pages one CPU produced in one buffer.

    ``pages()`` streams them page by page (a memoryview of ``page_size`` bytes each) so
    that a trace bigger than memory can be decoded: uncompressed data is a view into an
    mmap of the file, compressed data is inflated one chunk at a time. A view is only
    valid until the next page is requested or the source is closed; copy what you keep.
    ``size`` counts bytes of (uncompressed) page data.

    ``chunks(max_bytes)`` streams the same bytes as runs of whole pages, each in a
    buffer of its own that the caller may keep (the decoder's batches point into it).
    Sources read these with ``readinto``/``pread`` into fresh buffers rather than through
    a long-lived mapping, so memory stays bounded by the chunks in use, whatever the
    file size (a mapping's touched pages would stay resident until it is unmapped).
    """

    def __init__(self, cpu: int, size: int, pager: Callable[[], Iterator[memoryview]],
                 *, offset: Optional[int] = None, compressed: bool = False,
                 chunker: Optional[Callable[[int], Iterator[ChunkBuffer]]] = None):
        self.cpu = cpu
        self.size = size
        self.offset = offset            # where the data starts in its file (or None)
        self.compressed = compressed
        self._pager = pager
        self._chunker = chunker

    def pages(self) -> Iterator[memoryview]:
        return self._pager()

    def chunks(self, max_bytes: int) -> Iterator[ChunkBuffer]:
        """Whole pages, about ``max_bytes`` at a time (at least one page per chunk)."""
        if self._chunker is not None:
            return self._chunker(max_bytes)
        return _join_pages(self._pager(), max_bytes)

    def __repr__(self) -> str:
        return f"CpuData(cpu={self.cpu}, size={self.size}, compressed={self.compressed})"


def _join_pages(pages: Iterator[memoryview], max_bytes: int) -> Iterator[bytearray]:
    """Copy pages into fresh buffers of about ``max_bytes`` each."""
    out = bytearray()
    for p in pages:
        out += p
        if len(out) >= max_bytes:
            yield out
            out = bytearray()
    if out:
        yield out


@dataclass
class Buffer:
    """One ftrace buffer (the top one, ``name == ""``, or an instance) and its CPUs.

    ``cpus`` lists only CPUs that have an entry in the file, in file order; a CPU whose
    ``size`` is 0 is "empty" in trace-cmd's words.
    """

    name: str
    clock: Optional[str]
    cpus: list[CpuData] = field(default_factory=list)
    page_size: Optional[int] = None


class TraceSource:
    """What every input (a trace.dat, a raw directory) looks like to the decoder.

    Attributes:
      path, kind ("tracedat" | "rawdir"), version (6 or 7 for trace.dat, None otherwise),
      endian ("<" or ">"), long_size (4 or 8, user space long of the traced machine),
      page_size, header_page, header_event (tracefs texts), ftrace_formats (format texts
      of ftrace's own events), event_formats ((system, format text) pairs), kallsyms,
      printk_formats, cmdlines (saved_cmdlines text), options (decoded known options,
      see ``tracedat_read.decode_options``; every option as (id, bytes) under "raw"),
      buffers (list of Buffer), nr_cpus (what ``trace-cmd report`` prints as
      ``cpus=N``), compression (codec name, "none" when not compressed).
    Sources hold an open file (mmap); use them as a context manager or call close().
    """

    path: str = ""
    kind: str = ""
    version: Optional[int] = None
    endian: str = "<"
    long_size: int = 8
    page_size: int = 4096
    header_page: bytes = b""
    header_event: bytes = b""
    ftrace_formats: list
    event_formats: list
    kallsyms: bytes = b""
    printk_formats: bytes = b""
    cmdlines: bytes = b""
    options: dict
    buffers: list
    nr_cpus: int = 0
    compression: str = "none"

    def __init__(self) -> None:
        self.ftrace_formats = []
        self.event_formats = []
        self.options = {"raw": []}
        self.buffers = []

    def close(self) -> None:
        pass

    def __enter__(self) -> "TraceSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def buffer(self, name: str = "") -> Buffer:
        """The buffer called ``name``; KeyError if there is none."""
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    def __repr__(self) -> str:
        names = [b.name or "<top>" for b in self.buffers]
        return f"<{type(self).__name__} {self.kind} v{self.version} {self.path!r} buffers={names}>"


__all__ = ["CpuData", "Buffer", "TraceSource"]
