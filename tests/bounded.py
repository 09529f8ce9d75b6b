"""Run a vmtrace command the way an attacker's input would meet it: in a child process
with an address-space limit and a wall-clock timeout, measuring what it used.

Hostile-input tests (crafted trace files, raw directories, hostile guests) assert three
things about every run, whatever the input: it ended within its time, it stayed inside
its memory, and it ended either well (exit 0) or with exactly one ``vmtrace: error:``
line (exit 2) and no traceback. :func:`run_bounded` measures; :func:`assert_clean_exit`
asserts the last one.
"""
from __future__ import annotations

import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

# Address space is not resident memory: numpy, pyarrow and zstd map far more than they
# touch. The limit must still stop a runaway allocation long before the machine is hurt.
DEFAULT_AS_LIMIT = 4 << 30


@dataclass
class Bounded:
    """The outcome of one bounded run."""

    args: Sequence[str]
    returncode: int
    stdout: str
    stderr: str
    wall_s: float
    max_rss_kb: int          # the child's peak resident set, from wait4
    timed_out: bool

    def describe(self) -> str:
        return "%s: exit %s in %.1f s, peak RSS %d MB%s; stderr: %s" % (
            " ".join(self.args), self.returncode, self.wall_s, self.max_rss_kb // 1024,
            " (TIMED OUT)" if self.timed_out else "", self.stderr.strip()[-600:])


def _limit(as_bytes: int):
    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (as_bytes, as_bytes))
        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return apply


def run_bounded(args: Sequence[str], *, timeout: float = 60.0, as_limit: int = DEFAULT_AS_LIMIT,
                env: Optional[Mapping[str, str]] = None, cwd: Optional[str] = None,
                stdin: Optional[bytes] = None) -> Bounded:
    """Run ``python -m vmtrace ARGS`` (or ``args`` as given when its first word is a path)
    under ``RLIMIT_AS`` and ``timeout`` seconds; never raises on the command's result.

    The child is reaped with ``wait4`` so that its own peak RSS is measured, not the
    largest of all children this test process ever had.
    """
    cmd = list(args)
    if not cmd or os.path.sep not in cmd[0]:
        cmd = [sys.executable, "-m", "vmtrace", *cmd]
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        if stdin is not None:
            fin.write(stdin)
            fin.seek(0)
        t0 = time.monotonic()
        proc = subprocess.Popen(cmd, stdin=fin if stdin is not None else subprocess.DEVNULL, stdout=fout,
                                stderr=ferr, env=dict(env) if env else None, cwd=cwd,
                                preexec_fn=_limit(as_limit))
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            proc.kill()

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(status)   # reaped here, not by Popen
        wall = time.monotonic() - t0
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    return Bounded(cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                   wall, usage.ru_maxrss, fired.is_set())


def assert_clean_exit(res: Bounded, *, max_wall_s: Optional[float] = None,
                      max_rss_mb: Optional[int] = None) -> None:
    """Exit 0, or exit 2 with exactly one ``vmtrace: error:`` line; never a traceback."""
    assert not res.timed_out, res.describe()
    assert "Traceback" not in res.stderr, res.describe()
    assert res.returncode in (0, 2), res.describe()
    if res.returncode == 2:
        lines = [l for l in res.stderr.splitlines() if l.strip()]
        assert len(lines) == 1 and lines[0].startswith("vmtrace: error: "), res.describe()
    if max_wall_s is not None:
        assert res.wall_s <= max_wall_s, res.describe()
    if max_rss_mb is not None:
        assert res.max_rss_kb <= max_rss_mb * 1024, res.describe()
