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

    Linux starts a child's peak RSS at its parent's size when it was forked (the copy
    of the parent counts until exec), so a child forked from a test process that has
    grown to 300 MB reports at least 300 MB whatever it used itself. The command is
    therefore started by a small launcher (:data:`_LAUNCHER`) that forks it from its
    own few megabytes, reaps it with ``wait4`` and writes its peak RSS to a file.
    """
    cmd = list(args)
    if not cmd or os.path.sep not in cmd[0]:
        cmd = [sys.executable, "-m", "vmtrace", *cmd]
    with tempfile.TemporaryFile() as fin, tempfile.TemporaryFile() as fout, tempfile.TemporaryFile() as ferr:
        if stdin is not None:
            fin.write(stdin)
            fin.seek(0)
        rss_file = tempfile.NamedTemporaryFile(prefix="vmtrace-rss-", delete=False)
        rss_file.close()
        t0 = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-S", "-c", _LAUNCHER, rss_file.name, *cmd],
                                stdin=fin if stdin is not None else subprocess.DEVNULL, stdout=fout,
                                stderr=ferr, env=dict(env) if env else None, cwd=cwd,
                                preexec_fn=_limit(as_limit), start_new_session=True)
        fired = threading.Event()

        def kill() -> None:
            fired.set()
            try:
                os.killpg(proc.pid, 9)       # the launcher and the command it started
            except ProcessLookupError:
                pass

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            proc.wait()
        finally:
            timer.cancel()
        wall = time.monotonic() - t0
        try:
            with open(rss_file.name) as f:
                rss_kb = int(f.read() or 0)
        finally:
            os.unlink(rss_file.name)
        fout.seek(0)
        ferr.seek(0)
        out, err = fout.read(), ferr.read()
    return Bounded(cmd, proc.returncode, out.decode(errors="replace"), err.decode(errors="replace"),
                   wall, rss_kb, fired.is_set())


# Forks and execs argv[2:], passes on SIGINT/SIGTERM/SIGHUP (a test's Ctrl-C), waits for
# it, writes its ru_maxrss (KiB) to argv[1] and exits with its status. Run with -S so
# that it stays a few megabytes.
_LAUNCHER = """
import os, signal, sys
pid = os.fork()
if pid == 0:
    try:
        os.execv(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
    signal.signal(sig, lambda s, _f: os.kill(pid, s))
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""


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
