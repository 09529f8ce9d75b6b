"""The compression codecs of trace.dat v7: zstd and zlib, bounded against bombs.

trace-cmd stores every compressed block as ``<u32 compressed size><u32 uncompressed
size><data>``; the zstd frames it writes carry no content size, and a hostile file can
claim anything. So decompression here never trusts the frame: it produces at most the
declared uncompressed size (which must itself stay under ``MAX_BLOCK``), and output that
is longer or shorter than declared is a FormatError, not a silent truncation. The codec
libraries are imported only when a compressed file is met, so reading an uncompressed
trace does not need them.
"""
from __future__ import annotations

import io
import threading
import zlib
from typing import Optional

from vmtrace.errors import FormatError

# One compressed block (a metadata section or a data chunk) never decompresses to more
# than this. trace-cmd's largest block is kallsyms (a few MB); data chunks are 10 pages.
MAX_BLOCK = 256 << 20
# A chunk of CPU data: trace-cmd writes 10 pages; anything near this is hostile.
MAX_CHUNK = 16 << 20
# All metadata a reader keeps from one file (sections, options, kallsyms text), summed:
# a real kernel's comes to ~20 MB, and every byte of it stays in memory for the report.
MAX_METADATA_TOTAL = 128 << 20
# gzip'd kallsyms (a guest's kallsyms.gz) never inflates past this: a big kernel's
# /proc/kallsyms is ~15 MB, and the parsed table costs a few times the text.
MAX_GUNZIP = 64 << 20

__all__ = ["Codec", "get_codec", "codec_names", "gunzip_bounded", "Budget", "MAX_BLOCK",
           "MAX_CHUNK", "MAX_METADATA_TOTAL", "MAX_GUNZIP"]


class Budget:
    """Bytes one file may still make its reader keep, across all of its blocks.

    A per-block limit alone lets a chain of small compressed blocks (64 options sections
    of 256 MiB each in a 794 KB file) add up to gigabytes: the limit must be on the sum.
    Each block asks for its declared size before it is inflated, so the refusal comes
    before the allocation and names the block that went over.
    """

    def __init__(self, total: int, what: str = "metadata"):
        self.total = total
        self.left = total
        self.what = what

    def take(self, n: int, *, source: Optional[str] = None, offset: Optional[int] = None) -> None:
        if n > self.left:
            raise FormatError(f"{self.what} would exceed {self.total} bytes in all "
                              f"({self.total - self.left} already, {n} more here)",
                              source=source, offset=offset)
        self.left -= n


def gunzip_bounded(data: bytes | memoryview, limit: int = MAX_GUNZIP, *, what: str = "gzip data",
                   source: Optional[str] = None) -> bytes:
    """Inflate gzip ``data`` (one or more members, as ``gzip.decompress`` reads them) to at
    most ``limit`` bytes; a bomb or corrupt data is a FormatError naming ``what``.

    ``gzip.decompress`` has no output limit: 2 MB of gzip members inflate to 2 GB.
    """
    out = bytearray()
    rest = bytes(data)
    try:
        while rest:
            d = zlib.decompressobj(wbits=31)
            out += d.decompress(rest, limit + 1 - len(out))
            if len(out) > limit or d.unconsumed_tail:
                raise FormatError(f"{what}: gzip data expands past the {limit}-byte limit",
                                  source=source)
            if not d.eof:
                raise FormatError(f"{what}: gzip data is truncated", source=source)
            rest = d.unused_data.lstrip(b"\0")    # gzip(1) pads members with NULs
    except zlib.error as e:
        raise FormatError(f"{what}: gzip data is corrupt ({e})", source=source) from None
    return bytes(out)


class Codec:
    """A named codec as it appears in the v7 file header (``name\\0version\\0``)."""

    name = "none"

    @property
    def version(self) -> str:
        return ""

    def compress(self, data: bytes) -> bytes:
        raise NotImplementedError

    def decompress(self, data: bytes | memoryview, size: int, *, source: Optional[str] = None,
                   offset: Optional[int] = None, limit: int = MAX_BLOCK,
                   budget: Optional["Budget"] = None) -> bytes:
        """Return exactly ``size`` bytes decoded from ``data``, or raise FormatError.

        ``budget``, when given, is charged ``size`` before anything is inflated.
        """
        if size < 0 or size > limit:
            raise FormatError(f"compressed block declares {size} bytes, limit is {limit}",
                              source=source, offset=offset)
        if budget is not None:
            budget.take(size, source=source, offset=offset)
        try:
            out = self._decompress(bytes(data), size)
        except FormatError as e:
            raise e.at(source=source, offset=offset)
        except MemoryError:
            raise FormatError(f"{self.name}: out of memory decompressing a block of {size} bytes",
                              source=source, offset=offset) from None
        except Exception as e:  # codec libraries raise their own error types
            raise FormatError(f"{self.name} data is corrupt ({e})", source=source,
                              offset=offset) from None
        if len(out) != size:
            raise FormatError(f"{self.name} block decompressed to {len(out)} bytes, header says {size}",
                              source=source, offset=offset)
        return out

    def _decompress(self, data: bytes, size: int) -> bytes:
        raise NotImplementedError


class ZlibCodec(Codec):
    """zlib streams as made by zlib's compress2() (the zlib wrapper, not raw deflate)."""

    name = "zlib"

    @property
    def version(self) -> str:
        return zlib.ZLIB_VERSION

    def compress(self, data: bytes) -> bytes:
        return zlib.compress(data, 6)

    def _decompress(self, data: bytes, size: int) -> bytes:
        d = zlib.decompressobj()
        out = d.decompress(data, size + 1)   # at most one byte more than promised
        if len(out) > size or d.unconsumed_tail:
            raise FormatError(f"zlib block expands past its declared {size} bytes")
        return out


class ZstdCodec(Codec):
    """zstd frames; the frame's own content size (if any) is ignored in favour of ours."""

    name = "zstd"

    def __init__(self) -> None:
        try:
            import zstandard
        except ImportError:  # pragma: no cover - a declared dependency
            raise FormatError("zstd-compressed trace.dat needs the 'zstandard' package") from None
        self._z = zstandard
        self._c = zstandard.ZstdCompressor(level=3, write_content_size=False)
        # zstd contexts must not be used by two threads at once, and CPUs are decoded
        # in parallel: one decompressor per thread.
        self._local = threading.local()
        self._clock = threading.Lock()

    @property
    def _d(self):
        d = getattr(self._local, "d", None)
        if d is None:
            # The window bound keeps a hostile frame from asking for a huge history buffer.
            d = self._local.d = self._z.ZstdDecompressor(max_window_size=1 << 27)
        return d

    @property
    def version(self) -> str:
        return ".".join(str(x) for x in self._z.ZSTD_VERSION)

    def compress(self, data: bytes) -> bytes:
        with self._clock:
            return self._c.compress(data)

    def _decompress(self, data: bytes, size: int) -> bytes:
        # stream_reader is bounded by what we ask for, unlike decompress(), which would
        # allocate whatever a frame header claims.
        reader = self._d.stream_reader(io.BytesIO(data), read_across_frames=True)
        parts = []
        got = 0
        while got <= size:
            chunk = reader.read(size + 1 - got)
            if not chunk:
                break
            parts.append(chunk)
            got += len(chunk)
        if got > size:
            raise FormatError(f"zstd block expands past its declared {size} bytes")
        return b"".join(parts)


_CODECS = {"zlib": ZlibCodec, "zstd": ZstdCodec}
_cache: dict[str, Codec] = {}


def codec_names() -> list[str]:
    return sorted(_CODECS)


def get_codec(name: str, *, source: Optional[str] = None, offset: Optional[int] = None) -> Codec:
    """The codec called ``name`` in a file header; unknown names are a FormatError."""
    if name not in _CODECS:
        raise FormatError(f"unknown compression algorithm {name!r} (known: {', '.join(codec_names())})",
                          source=source, offset=offset)
    if name not in _cache:
        _cache[name] = _CODECS[name]()
    return _cache[name]
