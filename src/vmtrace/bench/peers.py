"""Find the fixed reference C programs and compile them into a cache directory.

The sources under ``shared/bench`` are reference points that must not be tuned, so we
never copy or edit them: we compile them as they are, keyed by a hash of the source and
the compiler's identity, so that a changed source or compiler gives a fresh binary and
an unchanged one costs nothing on the next run.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Optional

from vmtrace.errors import VmtraceError

PEERS = {
    "intloop": ("intloop.c", ["-O2"]),
    "pingpong": ("pingpong.c", ["-O2"]),
    "seedlike-agent": ("seedlike-agent.c", ["-O2", "-pthread"]),
}

ENV_DIR = "VMTRACE_BENCH_PEERS"


def _candidates() -> List[Path]:
    out = []
    env = os.environ.get(ENV_DIR)
    if env:
        out.append(Path(env))
    # The checkout sits beside shared/ (…/main/src/vmtrace/bench/peers.py -> …/shared/bench).
    here = Path(__file__).resolve()
    for parent in here.parents:
        out.append(parent / "shared" / "bench")
    out.append(Path.cwd().parent / "shared" / "bench")
    return out


def source_dir() -> Path:
    """The directory holding the reference C files (``$VMTRACE_BENCH_PEERS`` wins)."""
    for cand in _candidates():
        if all((cand / src).is_file() for src, _ in PEERS.values()):
            return cand
    raise VmtraceError(
        "reference peers (intloop.c, pingpong.c, seedlike-agent.c) not found; "
        "set %s to the directory that holds them" % ENV_DIR
    )


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
