"""Find the guest kernel on the host and the modules it needs for virtio-serial.

The Debian cloud kernel builds virtio_pci and virtio_console as modules, and busybox's
`insmod` neither resolves dependencies nor decompresses. So we read `modules.dep`
ourselves, order the modules so every dependency is loaded first, and decompress them
on the host while building the image.
"""
from __future__ import annotations

import gzip
import lzma
import re
from dataclasses import dataclass
from pathlib import Path

from vmtrace.errors import VmtraceError

# What the guest needs: the PCI transport and the console (virtio-serial) driver.
WANTED_MODULES = ("virtio_pci", "virtio_console")


@dataclass(frozen=True)
class GuestKernel:
    version: str
    vmlinuz: Path
    moddir: Path
    modules: tuple[Path, ...]   # in load order

    def module_payload(self, path: Path) -> bytes:
        """The module's ELF bytes, whatever compression Debian shipped it with."""
        data = path.read_bytes()
        name = path.name
        try:
            if name.endswith(".ko.xz"):
                return lzma.decompress(data)
            if name.endswith(".ko.gz"):
                return gzip.decompress(data)
            if name.endswith(".ko.zst"):
                import zstandard
                return zstandard.ZstdDecompressor().decompress(data, max_output_size=64 << 20)
        except Exception as exc:  # corrupt module file: say which one
            raise VmtraceError(f"cannot decompress kernel module {path}: {exc}") from exc
        return data


def _version_key(version: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(kernel: str | Path | None = None, boot: Path = Path("/boot"),
                modules_root: Path = Path("/lib/modules")) -> GuestKernel:
    """Pick the newest cloud kernel that has its modules installed (or the one named)."""
    if kernel is not None:
        vmlinuz = Path(kernel)
        if not vmlinuz.is_file():
            raise VmtraceError(f"kernel {vmlinuz} not found")
        version = vmlinuz.name.removeprefix("vmlinuz-")
    else:
        candidates = [p for p in boot.glob("vmlinuz-*-cloud-amd64")
                      if (modules_root / p.name.removeprefix("vmlinuz-")).is_dir()]
        if not candidates:
            raise VmtraceError("no Debian cloud kernel found in /boot: "
                               "apt-get install linux-image-cloud-amd64 (make deps does it)")
        vmlinuz = max(candidates, key=lambda p: _version_key(p.name.removeprefix("vmlinuz-")))
        version = vmlinuz.name.removeprefix("vmlinuz-")
    moddir = modules_root / version
    if not (moddir / "modules.dep").is_file():
        raise VmtraceError(f"no modules for kernel {version} in {moddir}")
    if not vmlinuz.stat().st_mode & 0o444:
        raise VmtraceError(f"kernel {vmlinuz} is not readable")
    return GuestKernel(version, vmlinuz, moddir, tuple(_load_order(moddir, WANTED_MODULES)))


def _module_name(relpath: str) -> str:
    base = relpath.rsplit("/", 1)[-1]
    return re.sub(r"\.ko(\.(xz|gz|zst))?$", "", base).replace("-", "_")


def _load_order(moddir: Path, wanted: tuple[str, ...]) -> list[Path]:
    """Dependencies first (depth-first over modules.dep); built-in modules need nothing."""
    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (moddir / "modules.dep").read_text().splitlines():
        if ":" not in line:
            continue
        path, rest = line.split(":", 1)
        deps[_module_name(path)] = (path, rest.split())
    builtin: set[str] = set()
    builtin_file = moddir / "modules.builtin"
    if builtin_file.is_file():
        builtin = {_module_name(l) for l in builtin_file.read_text().split()}
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in order or name in builtin:
            return
        if name in chain:
            raise VmtraceError(f"module dependency cycle: {' -> '.join(chain + (name,))}")
        if name not in deps:
            raise VmtraceError(f"kernel module {name} not found in {moddir}/modules.dep")
        path, needs = deps[name]
        for dep in needs:
            visit(_module_name(dep), chain + (name,))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return [moddir / deps[name][0] for name in order]
