"""Build the lab guest's initramfs from what Debian installed on the host, once.

Everything the guest runs comes from host packages: the cloud kernel and its virtio
modules, busybox-static, the host's Python, the agent zipapp, and the reference
workloads compiled static. The image is cached under a key computed from all of those
inputs (paths, sizes and mtimes of the large files; contents of the small ones; the
source of this builder), so an unchanged host reuses it and any change rebuilds it.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

from vmtrace.errors import VmtraceError
from vmtrace.lab import cpio, guest_init, kernel as kernel_mod, pyruntime, workloads

Progress = Optional[Callable[[str], None]]
_BUILDER_MODULES = (cpio, guest_init, kernel_mod, pyruntime, workloads)


@dataclass(frozen=True)
class LabImage:
    """A built guest: boot `kernel` with `initrd`; the manifest says what is inside."""
    key: str
    kernel: Path
    initrd: Path
    manifest: dict

    @property
    def has_agent(self) -> bool:
        return bool(self.manifest.get("agent"))

    @property
    def python_home(self) -> str:
        return self.manifest["python"]["home"]


def cache_root() -> Path:
    env = os.environ.get("VMTRACE_CACHE")
    base = Path(env) if env else Path.home() / ".cache" / "vmtrace"
    return base / "lab"


def _stat_sig(path: Path) -> list:
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _busybox() -> Path:
    for cand in (Path("/bin/busybox"), Path("/usr/bin/busybox")):
        if cand.is_file():
            return cand
    raise VmtraceError("busybox not found: apt-get install busybox-static (make deps does it)")


def _busybox_applets(busybox: Path) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list-full"], capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmtraceError(f"cannot run {busybox}: {exc}") from exc
    return [l.strip() for l in out.stdout.splitlines() if l.strip()]


def export_agent(dest: Path) -> Optional[Path]:
    """The agent zipapp via `vmtrace agent --export`, or None while no agent exists yet."""
    if importlib.util.find_spec("vmtrace.commands.agent") is None:
        return None
    try:
        res = subprocess.run([sys.executable, "-m", "vmtrace", "agent", "--export", str(dest)],
                             capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise VmtraceError(f"vmtrace agent --export failed: {exc}") from exc
    if res.returncode != 0 or not dest.is_file():
        msg = (res.stderr.strip().splitlines() or ["no output"])[-1]
        raise VmtraceError(f"vmtrace agent --export failed: {msg}")
    return dest


def _zip_fingerprint(path: Path) -> str:
    """Content identity of a zipapp, blind to the timestamps zipfile writes."""
    h = hashlib.sha256()
    with zipfile.ZipFile(path) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            h.update(f"{info.filename}:{info.CRC:08x}:{info.file_size}\n".encode())
    return h.hexdigest()


def image_key(kern: kernel_mod.GuestKernel, py: pyruntime.PythonRuntime, busybox: Path,
              agent: Optional[Path]) -> str:
    h = hashlib.sha256()
    inputs = {
        "builder": [hashlib.sha256(Path(m.__file__).read_bytes()).hexdigest()
                    for m in _BUILDER_MODULES] + [hashlib.sha256(Path(__file__).read_bytes()).hexdigest()],
        "kernel": _stat_sig(kern.vmlinuz),
        "modules": [_stat_sig(m) for m in kern.modules],
        "busybox": _stat_sig(busybox),
        "python": [[g] + _stat_sig(src)[1:] for g, src in py.files],
        "agent": _zip_fingerprint(agent) if agent else None,
        "workloads": workloads.fingerprint(),
    }
    h.update(json.dumps(inputs, sort_keys=True).encode())
    return h.hexdigest()


def build_image(*, python: str | Path | None = None, kernel: str | Path | None = None,
                force: bool = False, progress: Progress = None) -> LabImage:
    """Return the cached image for the current inputs, building it if needed."""
    say = progress or (lambda msg: None)
    kern = kernel_mod.find_kernel(kernel)
    py = pyruntime.collect(python)
    busybox = _busybox()
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=root) as tmp:
        tmpdir = Path(tmp)
        agent = export_agent(tmpdir / "agent.pyz")
        key = image_key(kern, py, busybox, agent)
        final = root / key[:20]
        with open(root / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)     # one builder at a time; the rest reuse
            if not force and (final / "manifest.json").is_file():
                say(f"guest image cached: {final}")
                return _load(final)
            say(f"building guest image (kernel {kern.version}, Python "
                f"{'.'.join(map(str, py.version))}, agent {'yes' if agent else 'not yet available'})")
            t0 = time.monotonic()
            bins = workloads.compile_all(tmpdir / "bin")
            stage = tmpdir / "image"
            stage.mkdir()
            initrd = stage / "initrd.gz"
            with open(initrd, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb",
                                                          compresslevel=1, mtime=0) as gz:
                w = cpio.CpioWriter(gz)
                _populate(w, kern, py, busybox, agent, bins)
                w.close()
            manifest = {
                "key": key, "kernel": str(kern.vmlinuz), "kernel_version": kern.version,
                "modules": [m.name for m in kern.modules],
                "python": {"executable": str(py.executable), "home": py.home,
                           "version": list(py.version)},
                "agent": "/lab/agent.pyz" if agent else None,
                "workloads": sorted(bins),
                "initrd_bytes": initrd.stat().st_size,
                "build_seconds": round(time.monotonic() - t0, 2),
            }
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            if final.exists():
                shutil.rmtree(final)
            os.rename(stage, final)
            _prune(root, keep=final)
            say(f"guest image built in {manifest['build_seconds']} s: "
                f"{manifest['initrd_bytes'] / 1e6:.1f} MB at {final}")
            return _load(final)


def _prune(root: Path, keep: Path, max_images: int = 3) -> None:
    """Images of older inputs are dead weight (23 MB each); keep only the newest few."""
    images = sorted((d for d in root.iterdir() if (d / "manifest.json").is_file() and d != keep),
                    key=lambda d: d.stat().st_mtime, reverse=True)
    for old in images[max_images - 1:]:
        shutil.rmtree(old, ignore_errors=True)


def _load(d: Path) -> LabImage:
    manifest = json.loads((d / "manifest.json").read_text())
    return LabImage(manifest["key"], Path(manifest["kernel"]), d / "initrd.gz", manifest)


def _populate(w: cpio.CpioWriter, kern: kernel_mod.GuestKernel, py: pyruntime.PythonRuntime,
              busybox: Path, agent: Optional[Path], bins: dict[str, Path]) -> None:
    for d in ("proc", "sys", "dev", "tmp", "run", "root", "etc", "lab/bin", "lab/modules"):
        w.mkdir(d)
    w.add_chardev("dev/console", 5, 1)
    w.add_chardev("dev/null", 1, 3, 0o666)
    w.add_bytes("init", guest_init.INIT_SCRIPT.encode(), 0o755)
    w.add_bytes("lab/lib.sh", guest_init.LIB_SCRIPT.encode(), 0o644)
    w.add_file("bin/busybox", busybox, 0o755)
    for applet in _busybox_applets(busybox):
        if applet not in ("bin/busybox", "init", "linuxrc"):
            depth = applet.count("/")
            w.add_symlink(applet, "../" * depth + "bin/busybox")
    names = []
    for mod in kern.modules:
        name = kernel_mod._module_name(mod.name)
        w.add_bytes(f"lab/modules/{name}.ko", kern.module_payload(mod), 0o644)
        names.append(name)
    w.add_bytes("lab/modules.order", ("\n".join(names) + "\n").encode())
    for guest_path, src in py.files:
        w.add_file(guest_path, src)
    exe = str(py.executable)
    for alias in ("/usr/bin/python3", "/bin/python3"):
        if alias != exe:
            w.add_symlink(alias, exe)
    env = (f"export PYTHONHOME={py.home}\n"
           "export PYTHONDONTWRITEBYTECODE=1\n"
           "export HOME=/root\n"
           "export VMTRACE_LAB=1\n")
    w.add_bytes("lab/env", env.encode())
    for name, exe_path in bins.items():
        w.add_file(f"lab/bin/{name}", exe_path, 0o755)
    if agent:
        w.add_file("lab/agent.pyz", agent, 0o644)
    w.add_bytes("etc/hostname", b"vmtrace-lab\n")
    w.add_bytes("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_bytes("etc/group", b"root:x:0:\n")
