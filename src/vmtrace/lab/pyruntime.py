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
SKIP_DIRS = {"test", "tests", "tkinter", "idlelib", "turtledemo", "site-packages",
             "dist-packages", "ensurepip", "lib2to3", "pydoc_data", "venv"}
SKIP_PREFIXES = ("config-",)
SKIP_DYNLOAD = ("_tkinter", "_test", "xxlimited", "_xxtest", "_ctypes_test")

_PROBE = (
    "import json, sys, sysconfig;"
    "print(json.dumps({'executable': sys.executable, 'prefix': sys.prefix,"
    " 'exec_prefix': sys.exec_prefix, 'stdlib': sysconfig.get_paths()['stdlib'],"
    " 'platstdlib': sysconfig.get_paths()['platstdlib'],"
    " 'dynload': sysconfig.get_config_var('DESTSHARED') or '',"
    " 'libdir': sysconfig.get_config_var('LIBDIR') or '',"
    " 'ldlibrary': sysconfig.get_config_var('INSTSONAME') or '',"
    " 'version': list(sys.version_info[:3])}))"
)


@dataclass(frozen=True)
class PythonRuntime:
    executable: Path                       # the real binary (no venv or shim)
    home: str                              # PYTHONHOME in the guest
    version: tuple[int, int, int]
    files: tuple[tuple[str, Path], ...]    # (guest path, host source), sorted


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
    return PythonRuntime(real, home, tuple(info["version"]), tuple(sorted(files.items())))


def which(name: str) -> Path:
    found = shutil.which(name)
    if not found:
        raise VmtraceError(f"{name} not found on this host (make deps installs it)")
    return Path(found)
