"""Make real trace.dat files from this machine's tracefs, for tests.

``trace-cmd record`` does not work on this kernel (it touches the function tracer), so
we enable events ourselves in a private tracefs instance, run a workload, and let
``trace-cmd extract -B`` write the file. The instance keeps concurrent tests apart.
"""
from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterable, Optional

from vmtrace.tracefs import Tracefs

_counter = itertools.count()

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
    name = instance or f"vmtrace-test-{os.getpid()}-{next(_counter)}"
    tf = Tracefs.create_instance(name)
    try:
        tf.tracing_on = False
        tf.buffer_size_kb = buffer_kb
        if clock:
            tf.clock = clock
        tf.enable_events(list(events))
        tf.clear()
        tf.tracing_on = True
        env = dict(os.environ, TMPDIR=str(out.parent))
        subprocess.run(["sh", "-c", workload], env=env, check=False, timeout=120,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(0.05)
        tf.tracing_on = False
        v7 = out if version == 7 else out.with_suffix(".v7.dat")
        subprocess.run(["trace-cmd", "extract", "-B", name, "-o", str(v7)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    finally:
        tf.remove()
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
