"""The raw directory: per-CPU page files plus the guest's metadata, as files.

This is what the guest agent writes with ``--output-dir``, what the host recorder spools
to while a guest runs, and what ``vmtrace report DIR`` reads (layout in
docs/internals.md). Metadata names arrive from guests, which are untrusted, so every
name is checked against the documented pattern (and for ``.``/``..`` components) before
it becomes a path, and every file is size-capped before it is read.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import stat
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

from vmtrace.errors import FormatError, VmtraceError
from vmtrace.protocol import metadata_name_ok
from vmtrace.format import Buffer, CpuData, TraceSource
from vmtrace.format.compress import MAX_GUNZIP, gunzip_bounded
from vmtrace.format.fileio import read_chunks, read_pages

LAYOUT = "vmtrace-raw"
LAYOUT_VERSION = 1

CPU_FILE_RE = re.compile(r"^cpu(\d{1,5})$")

MAX_META_JSON = 1 << 20          # meta.json is a few hundred bytes; 1 MiB is generous
MAX_METADATA_FILE = 64 << 20     # kallsyms of a big kernel is ~10 MB
# Linux's NR_CPUS is at most 8192 (CONFIG_MAXSMP): a cpuN file past it is not a CPU, and
# each CPU costs the decoder a chunk in flight.
MAX_CPUS = 8192
MAX_KALLSYMS = MAX_GUNZIP        # after gunzip (see format/compress.py)

__all__ = ["validate_name", "write_metadata", "write_rawdir", "read_rawdir", "RawDir",
           "is_rawdir", "LAYOUT", "LAYOUT_VERSION"]

CpuInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Iterable[bytes]]


def validate_name(name: str) -> str:
    """Return ``name`` if it may name a metadata file (:func:`vmtrace.protocol.metadata_name_ok`,
    the one rule), else raise VmtraceError."""
    if not metadata_name_ok(name):
        raise VmtraceError(f"refusing metadata name {name!r}: not an allowed raw-directory name")
    return name


def write_metadata(directory: str | os.PathLike, metadata: Mapping[str, bytes]) -> None:
    """Write ``metadata`` (relative name -> bytes) under ``DIR/metadata/``, all validated
    first so a bad name leaves nothing half-written."""
    names = [validate_name(n) for n in metadata]
    base = Path(directory) / "metadata"
    for name in names:
        data = metadata[name]
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise VmtraceError(f"metadata {name!r} must be bytes, not {type(data).__name__}")
        target = base / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, target)


def write_rawdir(directory: str | os.PathLike, metadata: Mapping[str, bytes],
                 cpus: Mapping[int, CpuInput]) -> Path:
    """Write a complete raw directory: metadata plus one ``cpuN`` file per CPU.

    A CPU's data may be bytes, a path to copy from, or an iterable of byte chunks
    (streamed, so a large capture is not held in memory).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    write_metadata(d, metadata)
    for cpu, data in cpus.items():
        if not isinstance(cpu, int) or cpu < 0:
            raise VmtraceError(f"bad CPU number {cpu!r}")
        with open(d / f"cpu{cpu}", "wb") as out:
            if isinstance(data, (bytes, bytearray, memoryview)):
                out.write(data)
            elif isinstance(data, (str, os.PathLike)):
                with open(data, "rb") as src:
                    while chunk := src.read(1 << 20):
                        out.write(chunk)
            else:
                for chunk in data:
                    out.write(chunk)
    return d


def is_rawdir(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "metadata").is_dir()


# Opening a file of a raw directory: never through a symbolic link (the directory may
# belong to someone else, and we may be root), never blocking on a FIFO.
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class _SafeDir:
    """A directory held open by descriptor; everything below is reached with ``dir_fd``
    and ``O_NOFOLLOW``, one component at a time, so no symlink and no special file
    under it is ever followed or opened, and nothing can be swapped in between a check
    and an open. ``rel`` is the path shown in errors (``metadata/events/sched``).
    """

    def __init__(self, fd: int, rel: str, source: str):
        self.fd, self.rel, self.source = fd, rel, source

    @classmethod
    def open_root(cls, path: str) -> "_SafeDir":
        """The directory the user named (the one path that may be a symlink)."""
        try:
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            raise FormatError(f"cannot open directory: {e.strerror}", source=path) from None
        return cls(fd, "", path)

    def _name(self, name: str) -> str:
        return f"{self.rel}/{name}" if self.rel else name

    def _refuse(self, name: str, what: str) -> FormatError:
        return FormatError(f"{self._name(name)} {what}; refusing to read it", source=self.source)

    def kind(self, name: str) -> Optional[str]:
        """"file", "dir", "link", "other", or None when there is no such entry."""
        try:
            st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise FormatError(f"cannot stat {self._name(name)}: {e.strerror}", source=self.source) from None
        if stat.S_ISLNK(st.st_mode):
            return "link"
        return "file" if stat.S_ISREG(st.st_mode) else "dir" if stat.S_ISDIR(st.st_mode) else "other"

    def _check(self, name: str, kind: Optional[str], want: str) -> None:
        if kind == "link":
            raise self._refuse(name, "is a symbolic link")
        if kind != want:
            raise self._refuse(name, "is not a regular file" if want == "file" else "is not a directory")

    def subdir(self, name: str) -> Optional["_SafeDir"]:
        """The subdirectory ``name``, None if absent; a symlink or a file is refused."""
        kind = self.kind(name)
        if kind is None:
            return None
        self._check(name, kind, "dir")
        try:
            fd = os.open(name, _DIR_FLAGS, dir_fd=self.fd)
        except OSError as e:
            raise self._refuse(name, f"cannot be opened ({e.strerror})") from None
        return _SafeDir(fd, self._name(name), self.source)

    def open_file(self, name: str) -> int:
        """A descriptor of the regular file ``name`` (the caller closes it)."""
        try:
            fd = os.open(name, _FILE_FLAGS, dir_fd=self.fd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise self._refuse(name, "is a symbolic link") from None
            raise FormatError(f"cannot open {self._name(name)}: {e.strerror}", source=self.source) from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise self._refuse(name, "is not a regular file")
        return fd

    def read(self, name: str, limit: int) -> Optional[bytes]:
        """The file's bytes (at most ``limit``, else an error), None when it is absent."""
        kind = self.kind(name)
        if kind is None:
            return None
        self._check(name, kind, "file")
        fd = self.open_file(name)
        try:
            with os.fdopen(fd, "rb", closefd=False) as f:
                data = f.read(limit + 1)
        except OSError as e:
            raise FormatError(f"cannot read {self._name(name)}: {e.strerror}", source=self.source) from None
        finally:
            os.close(fd)
        if len(data) > limit:
            raise FormatError(f"{self._name(name)} is larger than the {limit}-byte limit",
                              source=self.source)
        return data

    def names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.fd))
        except OSError as e:
            raise FormatError(f"cannot list {self.rel or '.'}: {e.strerror}", source=self.source) from None

    def close(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)


def _gunzip_capped(data: bytes, limit: int, source: str) -> bytes:
    """kallsyms.gz inflated to at most ``limit`` bytes (the trace.dat writer uses it too)."""
    return gunzip_bounded(data, limit, what="kallsyms.gz", source=source)


def _meta(raw: bytes, source: str) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"meta.json is not valid JSON ({e})", source=source) from None
    except RecursionError:
        # json's own depth guard; meta.json is a flat object of a few keys
        raise FormatError("meta.json is nested too deeply", source=source) from None
    if not isinstance(meta, dict):
        raise FormatError("meta.json is not a JSON object", source=source)
    if meta.get("layout", LAYOUT) != LAYOUT:
        raise FormatError(f"meta.json layout is {meta.get('layout')!r}, expected {LAYOUT!r}",
                          source=source)
    return meta


def _int_field(meta: dict, key: str, default: int, ok, source: str) -> int:
    v = meta.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or not ok(v):
        raise FormatError(f"meta.json: bad {key} {v!r}", source=source)
    return v


def _format_cpustat(cpu: str, st: Mapping) -> str:
    """An agent's per-CPU counters in the shape of tracefs per_cpu/cpuN/stats."""
    lines = [f"CPU: {cpu}"]
    for key, label in (("entries", "entries"), ("overrun", "overrun"),
                       ("commit_overrun", "commit overrun"), ("bytes", "bytes"),
                       ("dropped_events", "dropped events"), ("read_events", "read events")):
        if key in st:
            lines.append(f"{label}: {st[key]}")
    for key, val in st.items():
        if key not in ("entries", "overrun", "commit_overrun", "bytes", "dropped_events",
                       "read_events"):
            lines.append(f"{key.replace('_', ' ')}: {val}")
    return "\n".join(lines) + "\n"


class RawDir(TraceSource):
    """A raw directory opened as a TraceSource (one buffer, the guest's top buffer)."""

    kind = "rawdir"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        src = self.path
        self._root = _SafeDir.open_root(src)
        try:
            self._open(src)
        except BaseException:
            self.close()
            raise

    def _open(self, src: str) -> None:
        root = self._root
        md = root.subdir("metadata")
        if md is None:
            raise FormatError("not a raw directory (no metadata/ inside)", source=src)
        try:
            self._read_metadata(md, src)
        finally:
            md.close()
        m = self.meta
        clock = m.get("clock") if isinstance(m.get("clock"), str) else None
        buf = Buffer(name="", clock=clock, page_size=self.page_size)
        for name in root.names():
            mt = CPU_FILE_RE.fullmatch(name)
            if not mt:
                continue
            cpu = int(mt.group(1))
            if cpu >= MAX_CPUS:
                raise FormatError(f"{name}: CPU number past the {MAX_CPUS} that Linux can have",
                                  source=src)
            kind = root.kind(name)
            if kind != "file":
                root._check(name, kind, "file")
            buf.cpus.append(self._cpu(cpu, name))
        buf.cpus.sort(key=lambda c: c.cpu)
        self.buffers = [buf]
        nr = m.get("nr_cpus")
        present = max((c.cpu + 1 for c in buf.cpus), default=0)
        self.nr_cpus = nr if isinstance(nr, int) and not isinstance(nr, bool) and \
            present <= nr <= MAX_CPUS else present
        self.options = self._options(clock)

    def _read_metadata(self, md: "_SafeDir", src: str) -> None:
        raw_meta = md.read("meta.json", MAX_META_JSON)
        self.meta = _meta(raw_meta, src) if raw_meta is not None else {}
        m = self.meta
        self.page_size = _int_field(m, "page_size", mmap.PAGESIZE,
                                    lambda v: 256 <= v <= 1 << 24 and not v & (v - 1), src)
        self.long_size = _int_field(m, "long_size", 8, lambda v: v in (4, 8), src)
        endian = m.get("endian", "little")
        if endian not in ("little", "big"):
            raise FormatError(f"meta.json: bad endian {endian!r}", source=src)
        self.endian = "<" if endian == "little" else ">"

        def opt(name: str) -> bytes:
            return md.read(name, MAX_METADATA_FILE) or b""

        self.header_page = opt("header_page")
        self.header_event = opt("header_event")
        if not self.header_page or not self.header_event:
            raise FormatError("metadata/header_page or header_event is missing", source=src)
        self.cmdlines = opt("saved_cmdlines")
        self.printk_formats = opt("printk_formats")
        self.kallsyms = opt("kallsyms")
        if not self.kallsyms:
            gz = md.read("kallsyms.gz", MAX_METADATA_FILE)
            if gz is not None:
                self.kallsyms = _gunzip_capped(gz, MAX_KALLSYMS, src)
        self.ftrace_formats, self.event_formats = self._formats(md, src)

    @staticmethod
    def _formats(md: "_SafeDir", src: str) -> tuple[list[bytes], list[tuple[str, bytes]]]:
        """events/SYSTEM/EVENT/format (and the older ftrace/EVENT/format) files.

        Names outside the documented pattern and entries that are not directories are
        skipped, as before; a symbolic link anywhere on the way is refused.
        """
        ftrace: list[bytes] = []
        events: list[tuple[str, bytes]] = []

        def each(parent: "_SafeDir", ok) -> Iterator[tuple[str, bytes]]:
            for name in parent.names():
                kind = parent.kind(name)
                if kind == "link":
                    parent._check(name, kind, "dir")
                if kind != "dir" or not ok(name):
                    continue    # stray files are ignored, never followed
                evdir = parent.subdir(name)
                try:
                    data = evdir.read("format", MAX_METADATA_FILE)
                finally:
                    evdir.close()
                if data is not None:
                    yield name, data

        ev = md.subdir("events")
        if ev is not None:
            try:
                for system in ev.names():
                    kind = ev.kind(system)
                    if kind == "link":
                        ev._check(system, kind, "dir")
                    if kind != "dir":
                        continue
                    sysdir = ev.subdir(system)
                    try:
                        for _, data in each(sysdir, lambda e, s=system: bool(
                                metadata_name_ok(f"events/{s}/{e}/format"))):
                            if system == "ftrace":
                                ftrace.append(data)
                            else:
                                events.append((system, data))
                    finally:
                        sysdir.close()
            finally:
                ev.close()
        fdir = md.subdir("ftrace")
        if fdir is not None:
            try:
                ftrace.extend(data for _, data in
                              each(fdir, lambda e: bool(re.match(r"^[A-Za-z0-9_.-]+$", e))))
            finally:
                fdir.close()
        return ftrace, events

    def _options(self, clock: Optional[str]) -> dict:
        m = self.meta
        o: dict = {"raw": [], "cpustat": [], "guest": [], "meta": m}
        if clock:
            o["clock"] = clock
            o["trace_clock"] = f"[{clock}]"
        for key in ("hostname", "kernel"):
            if isinstance(m.get(key), str):
                o[key] = m[key]
        if "hostname" in o or "kernel" in o:
            o["uname"] = f"Linux {o.get('hostname', 'guest')} {o.get('kernel', 'unknown')}"
        o["cpucount"] = self.nr_cpus
        agent = m.get("agent")
        if isinstance(agent, dict) and isinstance(agent.get("version"), str):
            o["version"] = f"vmtrace-agent {agent['version']}"
        stats = m.get("stats")
        if isinstance(stats, dict):
            for cpu in sorted(stats, key=lambda c: (len(str(c)), str(c))):
                if isinstance(stats[cpu], dict):
                    o["cpustat"].append(_format_cpustat(str(cpu), stats[cpu]))
        return o

    def _cpu(self, cpu: int, name: str) -> CpuData:
        fd = self._root.open_file(name)
        try:
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        ps = self.page_size
        whole = size - size % ps   # a page cut short by a crash is dropped, not padded
        src = f"{self.path}/{name}"

        def opener() -> int:
            # Opened again for every chunk, through the directory's descriptor: one
            # descriptor in all however many CPUs are merged, and never a symlink.
            return self._root.open_file(name)

        # Read, not mapped: pages of a mapping stay resident once touched, so a 1 GB
        # capture would cost 1 GB of RSS (see format/fileio.py).
        def pages() -> Iterator[memoryview]:
            if whole:
                yield from read_pages(opener, 0, whole, ps, source=src)

        def chunks(max_bytes: int) -> Iterator[bytearray]:
            if whole:
                yield from read_chunks(opener, 0, whole, ps, max_bytes, source=src)

        return CpuData(cpu, whole, pages, offset=0, compressed=False, chunker=chunks)

    def close(self) -> None:
        root = getattr(self, "_root", None)
        if root is not None:
            root.close()


def read_rawdir(path: str | os.PathLike) -> RawDir:
    """Open a raw directory; FormatError when its metadata is missing or malformed."""
    return RawDir(path)
