"""Make real trace.dat files from this machine's tracefs, for tests.

``trace-cmd record`` does not work on this kernel (it touches the function tracer), so
we enable events ourselves in a private tracefs instance, run a workload, and let
``trace-cmd extract -B`` write the file. The instance keeps concurrent tests apart.
"""
from __future__ import annotations

import errno
import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs

_counter = itertools.count()

# Many event systems at once: a wide trace with dozens of event types.
SYSTEMS = ("sched", "timer", "kmem", "irq", "workqueue", "raw_syscalls", "syscalls", "block",
           "writeback", "filemap", "rcu", "signal", "task")

# A workload that touches many subsystems: fork/exec, pipes, files, sleeps, signals.
DEFAULT_WORKLOAD = (
    "for i in $(seq 30); do echo $i | cat > /dev/null; ls / > /dev/null; "
    "dd if=/dev/zero of=$TMPDIR/vmtrace-wl bs=64k count=4 conv=fsync status=none; "
    "sleep 0.005; kill -0 $$; done; rm -f $TMPDIR/vmtrace-wl"
)


def have_tracefs() -> bool:
    return os.geteuid() == 0 and (os.path.exists("/sys/kernel/tracing/trace_pipe") or _try_mount())


def _try_mount() -> bool:
    subprocess.run(["mount", "-t", "tracefs", "nodev", "/sys/kernel/tracing"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return os.path.exists("/sys/kernel/tracing/trace_pipe")


def have_trace_cmd() -> bool:
    return shutil.which("trace-cmd") is not None


def _retry(what: str, step, attempts: int = 6):
    """Run a tracefs step, retrying what a busy shared machine makes fail for a moment.

    Writes to a fresh instance can fail transiently while other tests and users trace
    at the same time (EBUSY from a ring buffer being resized or read, ENOMEM while
    buffers are allocated for other instances, EAGAIN/EINTR); the error then names the
    step, so a failure that persists says what it was.
    """
    for k in range(attempts):
        try:
            return step()
        except (VmtraceError, OSError) as exc:
            text = str(exc)
            transient = isinstance(exc, OSError) and exc.errno in _TRANSIENT or any(
                os.strerror(e) in text for e in _TRANSIENT)
            if not transient or k == attempts - 1:
                raise VmtraceError(f"recording a test trace: {what}: {text}") from exc
            time.sleep(0.1 * 2 ** k)


_TRANSIENT = (errno.EBUSY, errno.EAGAIN, errno.ENOMEM, errno.EINTR)


def _fresh_instance(name: str) -> Tracefs:
    """A new instance of our own: a name already taken (another process, a leftover of
    a killed run whose pid came back) gets a suffix instead of being shared."""
    for k in range(100):
        candidate = name if k == 0 else f"{name}-{k}"
        try:
            return _retry(f"creating instance {candidate}",
                          lambda: Tracefs.create_instance(candidate, exist_ok=False))
        except VmtraceError as exc:
            if "exists already" not in str(exc):
                raise
    raise VmtraceError(f"recording a test trace: no free instance name like {name}")


def _remove(tf: Tracefs) -> None:
    try:
        _retry(f"removing instance {tf.instance}", tf.remove)
    except VmtraceError:
        pass    # a leftover instance must not hide the test's own outcome


def record_tracedat(
    out: Path,
    events: Iterable[str] = ("sched", "timer", "irq"),
    workload: str = DEFAULT_WORKLOAD,
    buffer_kb: int = 1024,
    clock: Optional[str] = None,
    version: int = 7,
    instance: Optional[str] = None,
) -> Path:
    """Record ``workload`` with ``events`` into ``out`` (a trace.dat, v7 or v6)."""
    tf = _fresh_instance(instance or f"vmtrace-test-{os.getpid()}-{next(_counter)}")
    name = tf.instance
    try:
        _retry("tracing_on=0", lambda: setattr(tf, "tracing_on", False))
        _retry(f"buffer_size_kb={buffer_kb}", lambda: setattr(tf, "buffer_size_kb", buffer_kb))
        if clock:
            _retry(f"clock={clock}", lambda: setattr(tf, "clock", clock))
        _retry("enabling events", lambda: tf.enable_events(list(events)))
        _retry("clearing the buffer", tf.clear)
        _retry("tracing_on=1", lambda: setattr(tf, "tracing_on", True))
        env = dict(os.environ, TMPDIR=str(out.parent))
        subprocess.run(["sh", "-c", workload], env=env, check=False, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)
        _retry("tracing_on=0", lambda: setattr(tf, "tracing_on", False))
        v7 = out if version == 7 else out.with_suffix(".v7.dat")
        p = subprocess.run(["trace-cmd", "extract", "-B", name, "-o", str(v7)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
        if p.returncode != 0:
            raise VmtraceError(f"recording a test trace: trace-cmd extract -B {name} failed: "
                               + p.stderr.decode(errors="replace").strip()[-300:])
    finally:
        _remove(tf)
    if version == 6:
        convert_v6(v7, out)
        v7.unlink()
    return out


def convert_v6(src: Path, dst: Path) -> Path:
    subprocess.run(["trace-cmd", "convert", "--file-version", "6", "--compression", "none",
                    "-i", str(src), "-o", str(dst)], check=True, timeout=120,
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    return dst


def trace_cmd_report(path: Path, *args: str) -> str:
    return subprocess.run(["trace-cmd", "report", "-i", str(path), *args], check=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=600).stdout.decode(errors="replace")
