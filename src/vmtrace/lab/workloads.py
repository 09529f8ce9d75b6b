"""The guest's workloads: vmtrace's own C workloads, compiled static for busybox.

They are the same sources the benchmarks compile on the host (``vmtrace.bench.peers``),
so that a score measured in the guest means the same thing as one measured there.
Static linking keeps them independent of whatever libc the image carries.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from vmtrace.errors import VmtraceError

WORKLOADS = {"pingpong": "pingpong.c", "intloop": "intloop.c"}


def bench_dir() -> Path:
    """Where the workloads' C files live: the same place the benchmarks compile them from."""
    from vmtrace.lab.peers import source_dir

    return source_dir()


def sources() -> dict[str, Path]:
    root = bench_dir()
    out = {}
    for name, src in WORKLOADS.items():
        path = root / src
        if not path.is_file():
            raise VmtraceError(f"workload source {path} not found")
        out[name] = path
    return out


def fingerprint() -> str:
    """Changes when a source or the compiler changes, so the cached image is rebuilt."""
    h = hashlib.sha256()
    for name, path in sorted(sources().items()):
        h.update(name.encode() + b"\0" + path.read_bytes())
    try:
        ver = subprocess.run(["gcc", "--version"], capture_output=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmtraceError(f"gcc is needed to build the guest workloads: {exc}") from exc
    h.update(ver)
    return h.hexdigest()


def compile_all(outdir: Path) -> dict[str, Path]:
    """Build each workload as a static binary in `outdir`."""
    outdir.mkdir(parents=True, exist_ok=True)
    built = {}
    for name, src in sources().items():
        exe = outdir / name
        cmd = ["gcc", "-O2", "-static", "-o", str(exe), str(src)]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise VmtraceError(f"cannot compile {src}: {exc}") from exc
        if res.returncode != 0:
            first = (res.stderr.strip().splitlines() or ["?"])[0]
            raise VmtraceError(f"compiling {src} failed: {first}")
        built[name] = exe
    return built
