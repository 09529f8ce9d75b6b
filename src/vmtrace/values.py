"""Checks for values read from untrusted JSON: a guest's replies, meta.json, and the
session.json that ``vmtrace record`` writes and anyone may hand to ``check`` or
``report``. Both the recorder and the analysis use them, so they sit below both.

Standard library only (the recorder's checks and the merge import it).
"""
from __future__ import annotations

import re
from typing import Any, List, Optional

from vmtrace.errors import VmtraceError

# A guest has at most the ports `vmtrace prepare` makes (host/layout.py uses this bound).
MAX_CPUS = 1024
# Timestamps are int64 nanoseconds everywhere downstream (numpy, trace.dat readers).
NS_MAX = (1 << 63) - 1
# Ring-buffer and pump counters are 64-bit unsigned in the kernel and the agent.
U64_MAX = (1 << 64) - 1
# Guest text kept as guest data: a kernel release or a hostname is far shorter.
MAX_TEXT = 200

# trace clocks: local, global, counter, uptime, perf, mono, mono_raw, boot, tai, x86-tsc
_CLOCK = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
# one word of a uname line (kernel release, machine, version): no spaces, no controls
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}\Z")


def is_int(value: Any, lo: int, hi: int) -> bool:
    """A JSON integer (not a bool, not a float) within [lo, hi]."""
    return type(value) is int and lo <= value <= hi


def clock_name(value: Any) -> Optional[str]:
    """A trace clock's name, or None: it becomes a trace.dat option and a file field."""
    return value if isinstance(value, str) and _CLOCK.match(value) else None


def token(value: Any) -> Optional[str]:
    """One safe word (kernel release, machine), or None; it may end up in UNAME."""
    return value if isinstance(value, str) and _TOKEN.match(value) else None


def text(value: Any, limit: int = MAX_TEXT) -> Optional[str]:
    """Guest text made harmless to print on one line: controls replaced, length capped."""
    if not isinstance(value, str):
        return None
    out = "".join(c if c.isprintable() else "?" for c in value[:limit])
    return out + ("..." if len(value) > limit else "")


def short(value: Any, limit: int = 60) -> str:
    """Any guest value for an error message: one line, at most ``limit`` characters."""
    shown = repr(value) if not isinstance(value, str) else repr(text(value, limit))
    shown = "".join(c if c.isprintable() else "?" for c in shown)
    return shown if len(shown) <= limit else shown[:limit] + "..."


def cpu_list(value: Any, what: str) -> List[int]:
    """A list of distinct CPU numbers below MAX_CPUS, or VmtraceError naming ``what``."""
    if not isinstance(value, list) or len(value) > MAX_CPUS:
        raise VmtraceError("%s is not a list of at most %d CPU numbers: %s" % (what, MAX_CPUS, short(value)))
    for c in value:
        if not is_int(c, 0, MAX_CPUS - 1):
            raise VmtraceError("%s: %s is not a CPU number (0..%d)" % (what, short(c), MAX_CPUS - 1))
    if len(set(value)) != len(value):
        raise VmtraceError("%s names a CPU twice" % what)
    return list(value)
