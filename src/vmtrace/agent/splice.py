"""splice(2) for Python 3.9+: ``os.splice`` where it exists (3.10+), libc through ctypes otherwise.

Why splice at all: ftrace hands out whole ring-buffer pages through ``trace_pipe_raw``;
splicing them into a pipe and from the pipe into a port, file or socket moves page
references instead of copying 4 KiB per page through user space. That is what makes
the agent cheap (the seed's point), and it keeps Python's interpreter out of the
per-byte path entirely.
"""
from __future__ import annotations

import errno
import fcntl
import os
from typing import Callable, Optional

SPLICE_F_MOVE = 1
SPLICE_F_NONBLOCK = 2
SPLICE_F_MORE = 4

# fcntl.F_SETPIPE_SZ appeared in Python 3.10; the values are Linux's.
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)


def _libc_splice() -> Callable[[int, int, int, int], int]:
    # imported here: ctypes costs a guest ~7 ms of start-up that os.splice never needs
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c") or "libc.so.6"
    libc = ctypes.CDLL(name, use_errno=True)
    fn = libc.splice
    fn.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint]
    fn.restype = ctypes.c_ssize_t

    def splice(src: int, dst: int, count: int, flags: int = 0) -> int:
        # ctypes releases the GIL around foreign calls, like os.splice does.
        while True:
            n = fn(src, None, dst, None, count, flags)
            if n >= 0:
                return n
            err = ctypes.get_errno()
            if err != errno.EINTR:
                raise OSError(err, os.strerror(err))

    return splice


_os_splice: Optional[Callable[..., int]] = getattr(os, "splice", None)


def _py_splice(src: int, dst: int, count: int, flags: int = 0) -> int:
    assert _os_splice is not None
    return _os_splice(src, dst, count, flags=flags)


splice: Callable[[int, int, int, int], int]
IMPLEMENTATION: str
if _os_splice is not None and os.environ.get("VMTRACE_SPLICE") != "ctypes":
    splice, IMPLEMENTATION = _py_splice, "os.splice"
else:
    splice, IMPLEMENTATION = _libc_splice(), "ctypes"


def make_pipe(size: int) -> "tuple[int, int, int]":
    """A non-blocking pipe of ``size`` bytes: (read fd, write fd, actual size)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.fcntl(w, F_SETPIPE_SZ, size)
    except OSError:
        pass  # pipe-max-size below size for a non-root user: keep the default
    actual = fcntl.fcntl(w, F_GETPIPE_SZ)
    return r, w, actual
