"""Reading page data from files in bounded pieces.

Decoding used to walk CPU data through an mmap of the whole file. Every page touched
that way stays mapped, and so counts in the process's RSS (as RssFile), until the
mapping goes away: a 1 GB trace cost about 1 GB of resident memory although the decoder
only ever needs a few chunks. Here data is read with ``preadv`` into fresh buffers the
caller owns; once a chunk is dropped its memory is gone, and the page cache (which
does not count against the process) does the caching.
"""
from __future__ import annotations

import os
from typing import Callable, Iterator, Optional, Union

from vmtrace.errors import FormatError

__all__ = ["read_at", "read_chunks", "read_pages"]


def read_at(fd: int, buf: bytearray, pos: int, *, source: Optional[str] = None) -> int:
    """Fill ``buf`` from ``pos``; returns the bytes read (short only at end of file)."""
    mv = memoryview(buf)
    got = 0
    try:
        while got < len(buf):
            n = os.preadv(fd, [mv[got:]], pos + got)
            if n <= 0:
                break
            got += n
    except OSError as e:
        raise FormatError(f"cannot read: {e.strerror}", source=source, offset=pos + got) from None
    finally:
        mv.release()
    return got


Opener = Callable[[], int]


def read_chunks(path: Union[str, int, Opener], offset: int, size: int, page_size: int,
                max_bytes: int, *, pad_tail: bool = False,
                source: Optional[str] = None) -> Iterator[bytearray]:
    """``size`` bytes at ``offset`` of ``path`` as fresh buffers of whole pages.

    A last partial page is zero-padded to a whole page when ``pad_tail`` is set (what
    trace-cmd does with a CPU's data that does not end on a page), else dropped. A file
    that shrank while being read ends the stream at the last whole page. ``path`` may be
    an open file descriptor (left open) or a function that opens the file: then it is
    opened for each chunk and closed before the chunk is yielded, so that merging many
    CPUs holds no descriptor per CPU between chunks.
    """
    step = max(page_size, max_bytes - max_bytes % page_size)
    where = source or (path if isinstance(path, str) else None)
    if callable(path):
        fd, own = -1, False
    elif isinstance(path, int):
        fd, own = path, False
    else:
        own = True
        try:
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", source=source or path) from None
    try:
        pos, end = offset, offset + size
        while pos < end:
            want = min(step, end - pos)
            buf = bytearray(want)
            if callable(path):
                cfd = path()
                try:
                    got = read_at(cfd, buf, pos, source=where)
                finally:
                    os.close(cfd)
            else:
                got = read_at(fd, buf, pos, source=where)
            if got < want:
                del buf[got:]
            whole = len(buf) - len(buf) % page_size
            if whole < len(buf):
                if pad_tail and got == want and pos + want == end:
                    buf += bytes(page_size - len(buf) % page_size)
                    whole = len(buf)
                else:
                    del buf[whole:]
            if buf:
                yield buf
            if got < want:
                return
            pos += want
    finally:
        if own:
            os.close(fd)


def read_pages(path: Union[str, int, Opener], offset: int, size: int, page_size: int, *, pad_tail: bool = False,
               block: int = 1 << 20, source: Optional[str] = None) -> Iterator[memoryview]:
    """The same bytes page by page (views into 1 MB blocks read one at a time)."""
    for buf in read_chunks(path, offset, size, page_size, block, pad_tail=pad_tail,
                           source=source):
        view = memoryview(buf)
        for p in range(0, len(buf), page_size):
            yield view[p:p + page_size]
