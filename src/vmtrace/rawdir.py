"""The raw directory: per-CPU page files plus the guest's metadata, as files.

This is what the guest agent writes with ``--output-dir``, what the host recorder spools
to while a guest runs, and what ``vmtrace report DIR`` reads (layout in
docs/internals.md). Metadata names arrive from guests, which are untrusted, so every
name is checked against the documented pattern (and for ``.``/``..`` components) before
it becomes a path, and every file is size-capped before it is read.
"""
from __future__ import annotations

import json
import mmap
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Optional, Union

from vmtrace.errors import FormatError, VmtraceError
from vmtrace.format import Buffer, CpuData, TraceSource
from vmtrace.format.compress import MAX_GUNZIP, gunzip_bounded
from vmtrace.format.fileio import read_chunks, read_pages

LAYOUT = "vmtrace-raw"
LAYOUT_VERSION = 1

NAME_RE = re.compile(
    r"^(header_page|header_event|saved_cmdlines|printk_formats|kallsyms(\.gz)?|meta\.json"
    r"|events/[A-Za-z0-9_]+/[A-Za-z0-9_.-]+/format)$")
CPU_FILE_RE = re.compile(r"^cpu(\d{1,5})$")

MAX_META_JSON = 1 << 20          # meta.json is a few hundred bytes; 1 MiB is generous
MAX_METADATA_FILE = 64 << 20     # kallsyms of a big kernel is ~10 MB
MAX_KALLSYMS = MAX_GUNZIP        # after gunzip (see format/compress.py)

__all__ = ["validate_name", "write_metadata", "write_rawdir", "read_rawdir", "RawDir",
           "is_rawdir", "LAYOUT", "LAYOUT_VERSION"]

CpuInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Iterable[bytes]]


def validate_name(name: str) -> str:
    """Return ``name`` if it may name a metadata file, else raise VmtraceError.

    The pattern alone would let an event called ``..`` through; path components that
    are ``.`` or ``..`` are refused as well, so a name can never leave ``metadata/``.
    """
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise VmtraceError(f"refusing metadata name {name!r}: not an allowed raw-directory name")
    if any(part in (".", "..") for part in name.split("/")):
        raise VmtraceError(f"refusing metadata name {name!r}: '.' or '..' component")
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


def _read_capped(path: Path, limit: int, source: str) -> bytes:
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as e:
        raise FormatError(f"cannot read {path.name}: {e.strerror}", source=source) from None
    if len(data) > limit:
        raise FormatError(f"{path.name} is larger than the {limit}-byte limit", source=source)
    return data


def _gunzip_capped(data: bytes, limit: int, source: str) -> bytes:
    """kallsyms.gz inflated to at most ``limit`` bytes (the trace.dat writer uses it too)."""
    return gunzip_bounded(data, limit, what="kallsyms.gz", source=source)


def _meta(raw: bytes, source: str) -> dict:
    try:
        meta = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise FormatError(f"meta.json is not valid JSON ({e})", source=source) from None
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
        root = Path(path)
        md = root / "metadata"
        if not md.is_dir():
            raise FormatError("not a raw directory (no metadata/ inside)", source=self.path)
        src = self.path
        meta_path = md / "meta.json"
        self.meta = _meta(_read_capped(meta_path, MAX_META_JSON, src), src) if meta_path.exists() else {}
        m = self.meta
        self.page_size = _int_field(m, "page_size", mmap.PAGESIZE,
                                    lambda v: 256 <= v <= 1 << 24 and not v & (v - 1), src)
        self.long_size = _int_field(m, "long_size", 8, lambda v: v in (4, 8), src)
        endian = m.get("endian", "little")
        if endian not in ("little", "big"):
            raise FormatError(f"meta.json: bad endian {endian!r}", source=src)
        self.endian = "<" if endian == "little" else ">"

        def opt(name: str) -> bytes:
            p = md / name
            return _read_capped(p, MAX_METADATA_FILE, src) if p.exists() else b""

        self.header_page = opt("header_page")
        self.header_event = opt("header_event")
        if not self.header_page or not self.header_event:
            raise FormatError("metadata/header_page or header_event is missing", source=src)
        self.cmdlines = opt("saved_cmdlines")
        self.printk_formats = opt("printk_formats")
        self.kallsyms = opt("kallsyms")
        if not self.kallsyms and (md / "kallsyms.gz").exists():
            self.kallsyms = _gunzip_capped(opt("kallsyms.gz"), MAX_KALLSYMS, src)
        self.ftrace_formats, self.event_formats = self._formats(md, src)

        clock = m.get("clock") if isinstance(m.get("clock"), str) else None
        buf = Buffer(name="", clock=clock, page_size=self.page_size)
        for entry in sorted(root.iterdir(), key=lambda p: p.name):
            mt = CPU_FILE_RE.fullmatch(entry.name)
            if mt and entry.is_file():
                buf.cpus.append(self._cpu(int(mt.group(1)), entry))
        buf.cpus.sort(key=lambda c: c.cpu)
        self.buffers = [buf]
        nr = m.get("nr_cpus")
        present = max((c.cpu + 1 for c in buf.cpus), default=0)
        self.nr_cpus = nr if isinstance(nr, int) and not isinstance(nr, bool) and nr >= present else present
        self.options = self._options(clock)

    def _formats(self, md: Path, src: str) -> tuple[list[bytes], list[tuple[str, bytes]]]:
        ftrace, events = [], []
        ev = md / "events"
        if ev.is_dir():
            for sysdir in sorted(ev.iterdir()):
                if not sysdir.is_dir():
                    continue
                for evdir in sorted(sysdir.iterdir()):
                    name = f"events/{sysdir.name}/{evdir.name}/format"
                    f = evdir / "format"
                    if not NAME_RE.fullmatch(name) or not f.is_file():
                        continue    # stray files are ignored, never followed
                    data = _read_capped(f, MAX_METADATA_FILE, src)
                    if sysdir.name == "ftrace":
                        ftrace.append(data)
                    else:
                        events.append((sysdir.name, data))
        fdir = md / "ftrace"
        if fdir.is_dir():
            for evdir in sorted(fdir.iterdir()):
                f = evdir / "format"
                if re.match(r"^[A-Za-z0-9_.-]+$", evdir.name) and f.is_file():
                    ftrace.append(_read_capped(f, MAX_METADATA_FILE, src))
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

    def _cpu(self, cpu: int, path: Path) -> CpuData:
        size = path.stat().st_size
        ps = self.page_size
        whole = size - size % ps   # a page cut short by a crash is dropped, not padded

        name, src = os.fspath(path), f"{self.path}/cpu{cpu}"

        # Read, not mapped: pages of a mapping stay resident once touched, so a 1 GB
        # capture would cost 1 GB of RSS (see format/fileio.py).
        def pages() -> Iterator[memoryview]:
            if whole:
                yield from read_pages(name, 0, whole, ps, source=src)

        def chunks(max_bytes: int) -> Iterator[bytearray]:
            if whole:
                yield from read_chunks(name, 0, whole, ps, max_bytes, source=src)

        return CpuData(cpu, whole, pages, offset=0, compressed=False, chunker=chunks)


def read_rawdir(path: str | os.PathLike) -> RawDir:
    """Open a raw directory; FormatError when its metadata is missing or malformed."""
    return RawDir(path)
