"""vmtrace's own C peers (workloads and the seed-style collector), compiled on first use.

The sources ship inside the package (``vmtrace/lab/csrc/*.c``), so a clone, a wheel
or a tarball can run every benchmark and the demo's guest workloads with nothing beside
it. They are reference points: a benchmark compares vmtrace against them in the same run,
so they are kept small and are not tuned for any result. Binaries are cached under a key
of the source, the flags and the compiler's identity, so that a changed source or
compiler gives a fresh binary and an unchanged one costs nothing on the next run.

``$VMTRACE_BENCH_PEERS`` names another directory holding files of the same names, to
compare against another build of a peer; it is an option, never needed.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, Optional

from vmtrace.errors import VmtraceError

PEERS = {
    "intloop": ("intloop.c", ["-O2"]),
    "pingpong": ("pingpong.c", ["-O2"]),
    "seedlike-agent": ("seedlike-agent.c", ["-O2", "-pthread"]),
}

ENV_DIR = "VMTRACE_BENCH_PEERS"

# Beside this module in a checkout and in an installed package alike (package data).
PACKAGED = Path(__file__).resolve().parent / "csrc"


def source_dir() -> Path:
    """The directory holding the peers' C files: ``$VMTRACE_BENCH_PEERS`` if set, else ours."""
    env = os.environ.get(ENV_DIR)
    cand = Path(env) if env else PACKAGED
    missing = [src for src, _ in PEERS.values() if not (cand / src).is_file()]
    if missing:
        where = "%s (from $%s)" % (cand, ENV_DIR) if env else "%s (package data; the install is incomplete)" % cand
        raise VmtraceError("peer sources %s not found in %s" % (", ".join(missing), where))
    return cand


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "vmtrace" / "bench"


def _compiler_id(cc: str) -> bytes:
    try:
        proc = subprocess.run([cc, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmtraceError("cannot run the C compiler %s: %s" % (cc, exc))
    return proc.stdout.splitlines()[0] if proc.stdout else b""


def build(name: str, src_dir: Optional[Path] = None, out_dir: Optional[Path] = None, cc: str = "gcc",
          static: bool = False) -> Path:
    """Return the path of the compiled peer ``name``, compiling it if needed.

    ``static`` links it statically, for the lab guest (busybox, no shared libc there).
    """
    if name not in PEERS:
        raise VmtraceError("unknown reference peer %r (have: %s)" % (name, ", ".join(sorted(PEERS))))
    if shutil.which(cc) is None:
        raise VmtraceError("%s not found: the benchmark compiles its reference peers with it" % cc)
    src_file, flags = PEERS[name]
    if static:
        flags = flags + ["-static"]
        name = name + "-static"
    src = (src_dir or source_dir()) / src_file
    try:
        code = src.read_bytes()
    except OSError as exc:
        raise VmtraceError("cannot read %s: %s" % (src, exc.strerror))
    key = hashlib.sha256(code + b"\0" + " ".join(flags).encode() + b"\0" + _compiler_id(cc)).hexdigest()[:16]
    out_dir = out_dir or cache_dir()
    exe = out_dir / ("%s-%s" % (name, key))
    if exe.is_file() and os.access(exe, os.X_OK):
        return exe
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = exe.with_name(exe.name + ".%d.tmp" % os.getpid())
    proc = subprocess.run([cc, *flags, "-o", str(tmp), str(src)], capture_output=True, text=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        last = (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1]
        raise VmtraceError("compiling %s failed: %s" % (src, last))
    os.replace(tmp, exe)  # atomic, so a concurrent run never executes half a binary
    return exe


def build_all(src_dir: Optional[Path] = None, out_dir: Optional[Path] = None) -> Dict[str, Path]:
    return {name: build(name, src_dir, out_dir) for name in PEERS}
