"""A writer for the `newc` cpio format that the kernel unpacks as its initramfs.

We write the archive ourselves instead of staging a tree on disk and calling `cpio`:
it needs no root for the `/dev/console` node, every header is deterministic (mtime 0,
owner root), and a per-run overlay archive can be made in memory and appended to the
cached image (the kernel unpacks concatenated archives in order).
"""
from __future__ import annotations

import os
from pathlib import PurePosixPath
from typing import BinaryIO

_MAGIC = b"070701"
_TRAILER = "TRAILER!!!"


class CpioWriter:
    """Append entries to a newc archive; parent directories are created on demand."""

    def __init__(self, out: BinaryIO) -> None:
        self._out = out
        self._ino = 1
        self._dirs: set[str] = {"", "."}
        self._names: set[str] = set()
        self._closed = False

    def _header(self, name: str, mode: int, size: int, nlink: int = 1,
                rdev: tuple[int, int] = (0, 0)) -> None:
        raw = name.encode() + b"\0"
        fields = [self._ino, mode, 0, 0, nlink, 0, size, 0, 0, rdev[0], rdev[1], len(raw), 0]
        self._ino += 1
        head = _MAGIC + b"".join(b"%08X" % f for f in fields)
        self._out.write(head + raw)
        self._pad(len(head) + len(raw))

    def _pad(self, n: int) -> None:
        if n % 4:
            self._out.write(b"\0" * (4 - n % 4))

    @staticmethod
    def _clean(path: str) -> str:
        name = str(PurePosixPath("/" + path)).lstrip("/")
        if not name or ".." in PurePosixPath(name).parts:
            raise ValueError(f"bad archive path {path!r}")
        return name

    def _parents(self, name: str) -> None:
        parent = str(PurePosixPath(name).parent)
        if parent not in self._dirs:
            self.mkdir(parent)

    def _claim(self, name: str) -> bool:
        if name in self._names:
            return False
        self._names.add(name)
        return True

    def mkdir(self, path: str, mode: int = 0o755) -> None:
        name = self._clean(path)
        if name in self._dirs:
            return
        self._parents(name)
        self._dirs.add(name)
        self._names.add(name)
        self._header(name, 0o040000 | mode, 0, nlink=2)

    def add_bytes(self, path: str, data: bytes, mode: int = 0o644) -> None:
        """Add a regular file; a second entry for the same path is ignored (first wins)."""
        name = self._clean(path)
        self._parents(name)
        if not self._claim(name):
            return
        self._header(name, 0o100000 | mode, len(data))
        self._out.write(data)
        self._pad(len(data))

    def add_file(self, path: str, source: str | os.PathLike, mode: int | None = None) -> None:
        """Add the content of `source` (symlinks followed) under `path`."""
        with open(source, "rb") as f:
            data = f.read()
        if mode is None:
            mode = os.stat(source).st_mode & 0o7777
        self.add_bytes(path, data, mode)

    def add_symlink(self, path: str, target: str) -> None:
        name = self._clean(path)
        self._parents(name)
        if not self._claim(name):
            return
        raw = target.encode()
        self._header(name, 0o120000 | 0o777, len(raw))
        self._out.write(raw)
        self._pad(len(raw))

    def add_chardev(self, path: str, major: int, minor: int, mode: int = 0o600) -> None:
        name = self._clean(path)
        self._parents(name)
        if not self._claim(name):
            return
        self._header(name, 0o020000 | mode, 0, rdev=(major, minor))

    def close(self) -> None:
        if not self._closed:
            self._header(_TRAILER, 0, 0)
            self._closed = True
