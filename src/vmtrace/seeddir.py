"""A seed agent's output (cpuN files of raw pages, nothing else) read like any trace.

The 2012 agent sends pages only; the user copies the guest's tracefs formats by hand
(``--formats``). We lay both out as a raw directory in a private temporary directory,
so the normal reader opens it, and remove that directory when the trace is closed.
"""
from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
from typing import Any

from vmtrace.errors import VmtraceError

# All metadata read from a tracefs copy: a kernel's formats, kallsyms and cmdlines.
MAX_FORMATS_BYTES = 128 << 20
_CPU_FILE = re.compile(r"cpu\d+\Z")


def open_seed_dir(path: str, formats: str, *, keep_going: bool = False) -> Any:
    """A :class:`vmtrace.api.Trace` of the cpuN files in ``path`` with the formats of the
    tracefs copy ``formats``; closing it removes the private view."""
    from vmtrace import api
    from vmtrace.format.rawdir import write_metadata
    from vmtrace.format.tracefscopy import read_tracefs_copy

    src = os.path.abspath(path)
    if not os.path.isdir(src):
        raise VmtraceError(f"{path}: --formats needs a directory of cpuN files")
    tmp = tempfile.mkdtemp(prefix="vmtrace-seed-")
    try:
        write_metadata(tmp, read_tracefs_copy(formats, MAX_FORMATS_BYTES))
        if not _link_cpu_files(src, tmp, path):
            raise VmtraceError(f"{path}: no cpuN files")
        trace = api.open(tmp, keep_going=keep_going)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    trace.name = path
    close = trace.close

    def close_and_remove() -> None:
        try:
            close()
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    trace.close = close_and_remove  # type: ignore[method-assign]
    return trace


def _link_cpu_files(src: str, dst: str, shown: str) -> int:
    """Put every regular cpuN file of ``src`` into ``dst``: a hard link, or a copy when
    ``dst`` is on another file system. The raw-directory reader follows no symlink, so
    the view holds the files themselves; a symlink in ``src`` is refused."""
    n = 0
    for entry in sorted(os.listdir(src)):
        if not _CPU_FILE.match(entry):
            continue
        st = os.lstat(os.path.join(src, entry))
        if stat.S_ISLNK(st.st_mode):
            raise VmtraceError(f"{shown}: {entry} is a symbolic link; refusing to follow it")
        if not stat.S_ISREG(st.st_mode):
            continue
        try:
            os.link(os.path.join(src, entry), os.path.join(dst, entry), follow_symlinks=False)
        except OSError:
            shutil.copyfile(os.path.join(src, entry), os.path.join(dst, entry), follow_symlinks=False)
        n += 1
    return n
