"""Copy the host's Python interpreter into the guest, at the same paths.

The agent is stdlib-only, so the guest needs the interpreter, the shared libraries the
dynamic loader will ask for, and the standard library. Keeping every file at its host
path means the interpreter finds its stdlib from PYTHONHOME alone, and the loader finds
the libraries in its default directories; no wrapper scripts, no relinking.
Tests, GUI toolkits and third-party packages are left out: they are most of the size.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from vmtrace.errors import VmtraceError

# Directories of the stdlib that the guest never needs.
# The host's __pycache__ is left out too: its .pyc files are validated against the
# source's mtime, which the initramfs does not keep, so the guest would recompile every
# module on every start. compile_bytecode() makes ones that need no mtime instead.
SKIP_DIRS = {"test", "tests", "tkinter", "idlelib", "turtledemo", "site-packages",
             "dist-packages", "ensurepip", "lib2to3", "pydoc_data", "venv", "__pycache__"}
SKIP_PREFIXES = ("config-",)
# Debian's sitecustomize only installs apport's hook, which the guest does not have; every
# start would pay for a failed import searched along the whole sys.path.
SKIP_FILES = {"sitecustomize.py"}
SKIP_DYNLOAD = ("_tkinter", "_test", "xxlimited", "_xxtest", "_ctypes_test")

_PROBE = (
    "import json, sys, sysconfig;"
    "print(json.dumps({'executable': sys.executable, 'prefix': sys.prefix,"
    " 'exec_prefix': sys.exec_prefix, 'stdlib': sysconfig.get_paths()['stdlib'],"
    " 'platstdlib': sysconfig.get_paths()['platstdlib'],"
    " 'dynload': sysconfig.get_config_var('DESTSHARED') or '',"
    " 'libdir': sysconfig.get_config_var('LIBDIR') or '',"
    " 'ldlibrary': sysconfig.get_config_var('INSTSONAME') or '',"
    " 'cache_tag': sys.implementation.cache_tag or '',"
    " 'version': list(sys.version_info[:3])}))"
)


@dataclass(frozen=True)
class PythonRuntime:
    executable: Path                       # the real binary (no venv or shim)
    home: str                              # PYTHONHOME in the guest
    version: tuple[int, int, int]
    files: tuple[tuple[str, Path], ...]    # (guest path, host source), sorted
    cache_tag: str = ""                    # sys.implementation.cache_tag, e.g. cpython-311


def default_python() -> Path:
    """Debian's own python3 when present (what `python3-minimal` installs), else ours."""
    import sys
    for cand in (Path("/usr/bin/python3"), Path(getattr(sys, "_base_executable", sys.executable))):
        if cand.exists():
            return cand
    return Path(sys.executable)


def shared_libraries(binary: Path) -> list[Path]:
    """The libraries `ldd` resolves for `binary`, plus the loader; [] if it is static."""
    try:
        out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmtraceError(f"ldd {binary}: {exc}") from exc
    libs = []
    for line in out.stdout.splitlines():
        m = re.search(r"=>\s*(/\S+)", line) or re.match(r"\s*(/\S+)\s+\(", line)
        if m:
            libs.append(Path(m.group(1)))
        elif "not found" in line:
            raise VmtraceError(f"{binary}: a library is missing on the host: {line.strip()}")
    return libs


def collect(python: str | Path | None = None) -> PythonRuntime:
    """Describe every file of the interpreter the guest needs, with its guest path."""
    exe = Path(python) if python else default_python()
    try:
        out = subprocess.run([str(exe), "-S", "-c", _PROBE], capture_output=True,
                             text=True, timeout=60, env={"PATH": os.environ.get("PATH", "")})
        info = json.loads(out.stdout)
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError) as exc:
        raise VmtraceError(f"cannot run the Python interpreter {exe}: {exc}") from exc
    real = Path(os.path.realpath(info["executable"]))
    if tuple(info["version"]) < (3, 9):
        raise VmtraceError(f"{real} is Python {info['version']}; the agent needs 3.9 or newer")
    files: dict[str, Path] = {}
    files[str(real)] = real
    for lib in shared_libraries(real):
        files[str(lib)] = lib
    stdlib = Path(info["stdlib"])
    dynload = Path(info["dynload"]) if info["dynload"] else stdlib / "lib-dynload"
    for root, dirs, names in os.walk(stdlib):
        rel = Path(root).relative_to(stdlib)
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith(SKIP_PREFIXES))
        if Path(root) == dynload or rel.parts[:1] == ("lib-dynload",):
            continue
        for name in sorted(names):
            if not rel.parts and name in SKIP_FILES:
                continue
            p = Path(root) / name
            if p.is_file():
                files[str(p)] = p
    if dynload.is_dir():
        for so in sorted(dynload.glob("*.so")):
            if so.name.startswith(SKIP_DYNLOAD):
                continue
            try:
                deps = shared_libraries(so)
            except VmtraceError:
                continue  # an optional extension whose library is not installed: skip it
            files[str(so)] = so
            for lib in deps:
                files.setdefault(str(lib), lib)
    if info["ldlibrary"] and info["libdir"]:
        lib = Path(info["libdir"]) / info["ldlibrary"]
        if lib.exists():
            files[str(lib)] = lib
    home = info["prefix"] if info["prefix"] == info["exec_prefix"] else \
        f"{info['prefix']}:{info['exec_prefix']}"
    return PythonRuntime(real, home, tuple(info["version"]), tuple(sorted(files.items())),
                         info.get("cache_tag") or "")


# Run by the guest's own interpreter (so the bytecode is exactly its version's): for each
# job (source, name in tracebacks, output), write an unchecked-hash .pyc, which the
# import system loads without looking at the source's mtime or content. A .pyc the host
# already has for an unchanged source (Debian compiles the stdlib at install time) is
# reused with a new header; anything else is compiled.
_COMPILE = r"""
import importlib.util, json, os, py_compile, sys
MAGIC = importlib.util.MAGIC_NUMBER
UNCHECKED = (1).to_bytes(4, "little")          # flags: hash-based, do not check the source
jobs = json.load(sys.stdin)
reused = compiled = 0
failed = []
for src, dfile, cfile in jobs:
    os.makedirs(os.path.dirname(cfile), exist_ok=True)
    with open(src, "rb") as f:
        data = f.read()
    try:
        st = os.stat(src)
        with open(importlib.util.cache_from_source(src), "rb") as f:
            head = f.read(16)
            if (head[:4] == MAGIC and head[4:8] == bytes(4)
                    and int.from_bytes(head[8:12], "little") == int(st.st_mtime) & 0xFFFFFFFF
                    and int.from_bytes(head[12:16], "little") == st.st_size & 0xFFFFFFFF):
                with open(cfile, "wb") as out:
                    out.write(MAGIC + UNCHECKED + importlib.util.source_hash(data) + f.read())
                reused += 1
                continue
    except (OSError, ValueError, NotImplementedError):
        pass
    try:
        py_compile.compile(src, cfile=cfile, dfile=dfile, doraise=True,
                           invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH)
        compiled += 1
    except py_compile.PyCompileError as exc:
        failed.append(src)
print(json.dumps({"reused": reused, "compiled": compiled, "failed": failed}))
"""


def pyc_path(guest_source: str, cache_tag: str, legacy: bool = False) -> str:
    """Where the interpreter looks for a source's bytecode: __pycache__/NAME.TAG.pyc, or
    NAME.pyc beside it (`legacy`, the only place zipimport looks)."""
    d, name = os.path.split(guest_source)
    stem = name[:-3] if name.endswith(".py") else name
    if legacy:
        return os.path.join(d, stem + ".pyc")
    return os.path.join(d, "__pycache__", f"{stem}.{cache_tag}.pyc")


def compile_bytecode(py: PythonRuntime, sources: list[tuple[str, Path]], outdir: Path,
                     legacy: bool = False) -> tuple[list[tuple[str, Path]], dict]:
    """Unchecked-hash bytecode for (guest path, host source) pairs, made by `py` itself.

    Returns (guest .pyc path, host file) pairs and a summary (reused, compiled, failed).
    A source that does not compile is left without bytecode (the guest compiles it if
    it is ever imported, as before).
    """
    if not py.cache_tag:
        return [], {"reused": 0, "compiled": 0, "failed": []}
    jobs, out = [], []
    for i, (guest, src) in enumerate(sources):
        if not guest.endswith(".py"):
            continue
        cfile = outdir / f"{i}.pyc"
        jobs.append([str(src), guest, str(cfile)])
        out.append((pyc_path(guest, py.cache_tag, legacy), cfile))
    outdir.mkdir(parents=True, exist_ok=True)
    try:
        res = subprocess.run([str(py.executable), "-S", "-c", _COMPILE], input=json.dumps(jobs),
                             capture_output=True, text=True, timeout=600,
                             env={"PATH": os.environ.get("PATH", "")})
        summary = json.loads(res.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.TimeoutExpired, json.JSONDecodeError, IndexError) as exc:
        raise VmtraceError(f"{py.executable} could not precompile the guest's Python: {exc}") from exc
    return [(g, c) for g, c in out if c.is_file()], summary


def which(name: str) -> Path:
    found = shutil.which(name)
    if not found:
        raise VmtraceError(f"{name} not found on this host (make deps installs it)")
    return Path(found)
