"""A copy of a guest's tracefs, as a user makes it for a seed-style agent that cannot
send its own metadata: what it holds, read as metadata files under raw-directory names.

Two commands read such a copy (``record --formats`` for a guest whose agent speaks only
the seed's plain orders, ``report --formats`` for a seed agent's cpuN files), so the
layout is understood in one place. The copy is someone else's directory: nothing is
followed that is a symlink, every file is capped, and the total is capped.
"""
from __future__ import annotations

import os
import re
from typing import Dict

from vmtrace.errors import VmtraceError

_FIELD = re.compile(rb"field:\s*[^;]*?\b(\w+);\s*offset:\s*(\d+);\s*size:\s*(\d+);")
_SAFE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*\Z")
_SYSTEM = re.compile(r"^[A-Za-z0-9_]+\Z")


def read_tracefs_copy(directory: str, cap: int) -> Dict[str, bytes]:
    """Metadata files from ``directory``, laid out like tracefs (``events/header_page``,
    ``events/SYS/EV/format``, optionally ``saved_cmdlines``, ``printk_formats``,
    ``kallsyms``) or like a raw directory's ``metadata/`` (headers at the top)."""
    if not os.path.isdir(directory):
        raise VmtraceError("--formats: %s is not a directory" % directory)
    events = os.path.join(directory, "events")
    out: Dict[str, bytes] = {}
    total = 0

    def add(name: str, path: str) -> None:
        nonlocal total
        data = _read(path, cap, name)
        total += len(data)
        if total > cap:
            raise VmtraceError("--formats: %s holds more than the %d-byte cap" % (directory, cap))
        out[name] = data

    for name in ("header_page", "header_event"):
        for cand in (os.path.join(events, name), os.path.join(directory, name)):
            if os.path.isfile(cand):
                add(name, cand)
                break
        else:
            raise VmtraceError("--formats: %s has no %s (copy the guest's tracefs events/ directory)" % (directory, name))
    if os.path.isdir(events):
        for system in sorted(os.listdir(events)):
            sdir = os.path.join(events, system)
            if not _SYSTEM.match(system) or not os.path.isdir(sdir) or os.path.islink(sdir):
                continue
            for ev in sorted(os.listdir(sdir)):
                fmt = os.path.join(sdir, ev, "format")
                if _SAFE.match(ev) and os.path.isfile(fmt):
                    add("events/%s/%s/format" % (system, ev), fmt)
    for name in ("saved_cmdlines", "printk_formats", "kallsyms"):
        p = os.path.join(directory, name)
        if os.path.isfile(p):
            add(name, p)
    return out


def _read(path: str, cap: int, what: str) -> bytes:
    try:
        st = os.lstat(path)
        if not os.path.isfile(path) or os.path.islink(path):
            raise VmtraceError("--formats: %s is not a regular file" % path)
        if st.st_size > cap:
            raise VmtraceError("--formats: %s is over the %d-byte cap" % (path, cap))
        with open(path, "rb") as f:
            return f.read(cap + 1)[:cap]
    except OSError as exc:
        raise VmtraceError("--formats: cannot read %s (%s): %s" % (path, what, exc.strerror)) from None


def page_info(header_page: bytes) -> Dict[str, int]:
    fields = {m.group(1).decode(): (int(m.group(2)), int(m.group(3))) for m in _FIELD.finditer(header_page)}
    info = {"page_size": 4096, "long_size": 8}
    if "data" in fields:
        off, size = fields["data"]
        info["page_size"] = off + size
    if "commit" in fields:
        info["long_size"] = fields["commit"][1]
    return info
