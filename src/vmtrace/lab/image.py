"""Build the lab guest's initramfs from what Debian installed on the host, once.

Everything the guest runs comes from host packages: the cloud kernel and its virtio
modules, busybox-static, the host's Python, the agent zipapp, and the reference
workloads compiled static. The image is cached under a key computed from all of those
inputs (paths, sizes and mtimes of the large files; contents of the small ones; the
source of this builder), so an unchanged host reuses it and any change rebuilds it.
"""
from __future__ import annotations

import fcntl
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
INITRD = "initrd.cpio"
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
    """Return the cached image for the current inputs, building it if needed.

    Safe to call from several processes at once: one builds while the others wait and
    reuse, an image appears under its final name only when complete, and an image that
    a living process has returned from here is never pruned (see `_prune`).
    """
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
                _hold(final)
                say(f"guest image cached: {final}")
                return _load(final)
            say(f"building guest image (kernel {kern.version}, Python "
                f"{'.'.join(map(str, py.version))}, agent {'yes' if agent else 'not yet available'})")
            t0 = time.monotonic()
            bins = workloads.compile_all(tmpdir / "bin")
            pycs, compiled = pyruntime.compile_bytecode(
                py, [(g, src) for g, src in py.files if g.endswith(".py")], tmpdir / "pyc")
            agent_files = _agent_files(py, agent, tmpdir) if agent else []
            stage = tmpdir / "image"
            stage.mkdir()
            # Uncompressed: under TCG the kernel took 1.2-1.6 s to gunzip the 23 MB
            # archive and 0.45-0.6 s to unpack the 58 MB plain one; the host copies
            # either in well under 0.1 s.
            initrd = stage / INITRD
            with open(initrd, "wb") as raw:
                w = cpio.CpioWriter(raw)
                _populate(w, kern, py, busybox, agent_files, bins, pycs)
                w.close()
            manifest = {
                "key": key, "kernel": str(kern.vmlinuz), "kernel_version": kern.version,
                "modules": [m.name for m in kern.modules],
                "python": {"executable": str(py.executable), "home": py.home,
                           "version": list(py.version),
                           "bytecode": {"files": len(pycs), "reused": compiled["reused"],
                                        "compiled": compiled["compiled"],
                                        "failed": len(compiled["failed"])}},
                "agent": AGENT_PYZ if agent else None,
                "agent_dir": AGENT_DIR if agent else None,
                "workloads": sorted(bins),
                "initrd": INITRD,
                "initrd_bytes": initrd.stat().st_size,
                "build_seconds": round(time.monotonic() - t0, 2),
            }
            (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
            _install(stage, final)
            _hold(final)
            _prune(root, keep=final)
            say(f"guest image built in {manifest['build_seconds']} s: "
                f"{manifest['initrd_bytes'] / 1e6:.1f} MB at {final}")
            return _load(final)


def _install(stage: Path, final: Path) -> None:
    """Put a finished image in place so that no reader ever sees half of one.

    A new image is one rename of its directory (manifest.json inside, written last, is
    what marks an image complete). A forced rebuild of an existing key replaces the files
    one by one with rename: a process booting the old files keeps the inode it opened,
    and both versions have the same inputs anyway.
    """
    if final.is_dir() and not (final / "manifest.json").is_file():
        shutil.rmtree(final, ignore_errors=True)   # a half image from an older builder
    try:
        os.rename(stage, final)
        return
    except OSError:
        if not final.is_dir():
            raise
    for name in (INITRD, "manifest.json"):     # the manifest last: it names a whole image
        os.replace(stage / name, final / name)


# Pruning. An image is in use while a process that got it from build_image() lives: that
# process holds a shared flock on IMAGE/.use (released by the kernel when it exits), and
# a pruner deletes only what it can lock exclusively. Every use also touches IMAGE/.used;
# the newest images by that time are kept, and none used in the last PRUNE_GRACE seconds
# is deleted even if nobody holds it (a caller that only kept the paths, or an older
# vmtrace without the lock).
PRUNE_GRACE = 15 * 60
STALE_BUILD = 60 * 60
_HELD: dict[str, int] = {}


def touch_used(image_dir: Path) -> None:
    """Record that the image was just used (build_image and every boot call this)."""
    try:
        with open(image_dir / ".used", "a"):
            pass
        os.utime(image_dir / ".used")
    except OSError:
        pass


def _hold(d: Path) -> None:
    touch_used(d)
    if str(d) in _HELD:
        return
    try:
        fd = os.open(d / ".use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    fcntl.flock(fd, fcntl.LOCK_SH)   # never waits: pruners lock only under root/.lock
    _HELD[str(d)] = fd


def _last_used(d: Path) -> float:
    for name in (".used", "manifest.json"):
        try:
            return (d / name).stat().st_mtime
        except OSError:
            pass
    return 0.0


def _prune(root: Path, keep: Path, max_images: int = 3) -> None:
    """Images of older inputs are dead weight (23 MB each); keep only the newest few.

    Called with root/.lock held. Never deletes an image in use (see above).
    """
    now = time.time()
    images = sorted((d for d in root.iterdir()
                     if d != keep and d.is_dir() and (d / "manifest.json").is_file()),
                    key=_last_used, reverse=True)
    for old in images[max_images - 1:]:
        if str(old) in _HELD or now - _last_used(old) < PRUNE_GRACE:
            continue
        try:
            fd = os.open(old / ".use", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)            # some process still has it
            continue
        try:
            trash = root / f".trash-{old.name}-{os.getpid()}"
            os.rename(old, trash)   # gone from its name at once, then deleted at leisure
            shutil.rmtree(trash, ignore_errors=True)
        except OSError:
            pass
        finally:
            os.close(fd)
    for d in root.iterdir():        # builders that were killed leave these behind
        if d.name.startswith(("build-", ".trash-")) and d.is_dir():
            try:
                if now - d.stat().st_mtime > STALE_BUILD:
                    shutil.rmtree(d, ignore_errors=True)
            except OSError:
                pass


def _load(d: Path) -> LabImage:
    manifest = json.loads((d / "manifest.json").read_text())
    # (images built before the manifest named its initrd had a gzip'd one)
    return LabImage(manifest["key"], Path(manifest["kernel"]),
                    d / manifest.get("initrd", "initrd.gz"), manifest)


AGENT_PYZ = "/lab/agent.pyz"
AGENT_DIR = "/lab/agent"


def _agent_files(py: pyruntime.PythonRuntime, agent: Path, work: Path) -> list[tuple[str, Path]]:
    """The agent as the image carries it, with bytecode so the guest never compiles it.

    `AGENT_DIR` is the zipapp unpacked, with __pycache__ (`python3 /lab/agent`);
    `AGENT_PYZ` is the exported zipapp plus a NAME.pyc beside each module, where
    zipimport looks for bytecode (`python3 /lab/agent.pyz`, what the scripts run).
    """
    tree = work / "agent-tree"
    files: list[tuple[str, Path]] = []
    with zipfile.ZipFile(agent) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            name = cpio.CpioWriter._clean(info.filename)
            dest = tree / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(z.read(info))
            files.append((f"{AGENT_DIR}/{name}", dest))
    pycs, _ = pyruntime.compile_bytecode(py, files, work / "agent-pyc")
    in_zip = [(f"{AGENT_PYZ}/{g[len(AGENT_DIR) + 1:]}", src) for g, src in files]
    zpycs, _ = pyruntime.compile_bytecode(py, in_zip, work / "agent-zpyc", legacy=True)
    pyz = work / "agent-image.pyz"
    shutil.copyfile(agent, pyz)
    with zipfile.ZipFile(pyz, "a") as z:
        have = set(z.namelist())
        for guest, src in zpycs:
            arc = guest[len(AGENT_PYZ) + 1:]
            if arc not in have:
                z.writestr(zipfile.ZipInfo(arc, (1980, 1, 1, 0, 0, 0)), src.read_bytes(),
                           compress_type=zipfile.ZIP_STORED)
    return files + pycs + [(AGENT_PYZ, pyz)]


def _populate(w: cpio.CpioWriter, kern: kernel_mod.GuestKernel, py: pyruntime.PythonRuntime,
              busybox: Path, agent_files: list[tuple[str, Path]], bins: dict[str, Path],
              pycs: list[tuple[str, Path]] = ()) -> None:
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
    for guest_path, pyc in pycs:
        w.add_file(guest_path, pyc, 0o644)
    exe = str(py.executable)
    for alias in ("/usr/bin/python3", "/bin/python3"):
        if alias != exe:
            w.add_symlink(alias, exe)
    env = (f"export PYTHONHOME={py.home}\n"
           "export PYTHONDONTWRITEBYTECODE=1\n"
           "export PYTHONNOUSERSITE=1\n"
           "export HOME=/root\n"
           "export VMTRACE_LAB=1\n")
    w.add_bytes("lab/env", env.encode())
    for name, exe_path in bins.items():
        w.add_file(f"lab/bin/{name}", exe_path, 0o755)
    for guest_path, src in agent_files:
        w.add_file(guest_path, src, 0o644)
    w.add_bytes("etc/hostname", b"vmtrace-lab\n")
    w.add_bytes("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    w.add_bytes("etc/group", b"root:x:0:\n")
