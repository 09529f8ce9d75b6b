"""Writing trace.dat files (v7 with zstd/zlib/no compression, or v6) that trace-cmd reads.

The host recorder calls ``write_tracedat`` once a guest's recording is complete: the
metadata the agent sent (raw-directory names -> bytes) plus one spool file per CPU.
CPU data is streamed from those files a chunk at a time, so memory stays constant
however long the recording was.

Layout choices follow what trace-cmd 3.1.6 itself reads, not only the man page:
  * v7 sections are written back to back from the end of the file header, because
    trace-cmd finds the strings section by walking section headers in order;
  * the options section comes last (after the CPU data), so every offset it holds is
    known when it is written and only the header's 8-byte pointer needs patching;
  * CPU data starts page aligned and compressed data uses 10-page chunks, as trace-cmd
    writes them;
  * the guest's name travels in the UNAME option (``Linux NAME KERNEL``), which is where
    trace-cmd shows a machine's name, and the agent's counters as one CPUSTAT option per
    CPU in the text shape of tracefs per_cpu/cpuN/stats (``trace-cmd report --stat``).
"""
from __future__ import annotations

import json
import os
import re
import struct
from typing import BinaryIO, Iterable, Mapping, Optional, Sequence, Union

from vmtrace.errors import VmtraceError
from vmtrace.format.compress import Codec, get_codec
from vmtrace.format.tracedat_read import (
    MAGIC, OPT_BUFFER, OPT_CMDLINES, OPT_CPUCOUNT, OPT_CPUSTAT, OPT_DATE, OPT_DONE,
    OPT_EVENT_FORMATS, OPT_FTRACE_EVENTS, OPT_HEADER_INFO, OPT_HOOK, OPT_KALLSYMS,
    OPT_OFFSET, OPT_PRINTK, OPT_STRINGS, OPT_TRACECLOCK, OPT_TRACEID, OPT_UNAME,
    OPT_VERSION, SEC_FL_COMPRESS, parse_clock)

PAGES_PER_CHUNK = 10
_COPY = 1 << 20

__all__ = ["write_tracedat", "WRITER_VERSION"]

WRITER_VERSION = "vmtrace 0.1.0"

OptionValue = Union[str, bytes, int, Sequence[str]]
_EVENT_RE = re.compile(r"^events/([A-Za-z0-9_]+)/([A-Za-z0-9_.-]+)/format\Z")
_KNOWN_OPTIONS = {"clock", "trace_clock", "uname", "hostname", "kernel", "machine", "version",
                  "cpucount", "cpustat", "date", "offset", "hook", "traceid"}


class _Meta:
    """The metadata blobs sorted into the pieces a trace.dat holds."""

    def __init__(self, metadata: Mapping[str, bytes]):
        def blob(name: str) -> bytes:
            v = metadata.get(name, b"")
            if not isinstance(v, (bytes, bytearray, memoryview)):
                raise VmtraceError(f"metadata {name!r} must be bytes, not {type(v).__name__}")
            return bytes(v)

        self.header_page = blob("header_page")
        self.header_event = blob("header_event")
        if not self.header_page or not self.header_event:
            raise VmtraceError("cannot write a trace.dat without header_page and header_event")
        self.cmdlines = blob("saved_cmdlines")
        self.printk = blob("printk_formats")
        self.kallsyms = blob("kallsyms")
        if not self.kallsyms and metadata.get("kallsyms.gz"):
            from vmtrace.format.rawdir import MAX_KALLSYMS, _gunzip_capped
            self.kallsyms = _gunzip_capped(blob("kallsyms.gz"), MAX_KALLSYMS, "kallsyms.gz")
        self.ftrace: list[bytes] = []
        systems: dict[str, list[bytes]] = {}
        for name in metadata:
            m = _EVENT_RE.match(name)
            if not m:
                continue
            if m.group(1) == "ftrace":
                self.ftrace.append(blob(name))
            else:
                systems.setdefault(m.group(1), []).append(blob(name))
        for name in metadata:
            if name.startswith("ftrace/") and name.endswith("/format"):
                self.ftrace.append(blob(name))
        self.systems = systems
        raw = metadata.get("meta.json")
        try:
            self.meta = json.loads(bytes(raw).decode()) if raw else {}
        except (UnicodeDecodeError, ValueError) as e:
            raise VmtraceError(f"meta.json is not valid JSON: {e}") from None
        if not isinstance(self.meta, dict):
            raise VmtraceError("meta.json is not a JSON object")


class _Out:
    """A file being written, with the file's endianness and offset patching."""

    def __init__(self, f: BinaryIO, endian: str):
        self.f = f
        self.e = endian

    def tell(self) -> int:
        return self.f.tell()

    def raw(self, b: bytes) -> None:
        self.f.write(b)

    def num(self, fmt: str, *v: int) -> None:
        self.f.write(struct.pack(self.e + fmt, *v))

    def pack(self, fmt: str, *v: int) -> bytes:
        return struct.pack(self.e + fmt, *v)

    def patch(self, at: int, fmt: str, *v: int) -> None:
        here = self.f.tell()
        self.f.seek(at)
        self.num(fmt, *v)
        self.f.seek(here)

    def align(self, n: int) -> None:
        pad = -self.f.tell() % n
        if pad:
            self.f.write(bytes(pad))


# ---------------------------------------------------------------- shared pieces

def _header_info(o: _Out, md: _Meta) -> bytes:
    return (b"header_page\0" + o.pack("Q", len(md.header_page)) + md.header_page
            + b"header_event\0" + o.pack("Q", len(md.header_event)) + md.header_event)


def _ftrace(o: _Out, md: _Meta) -> bytes:
    return o.pack("I", len(md.ftrace)) + b"".join(o.pack("Q", len(t)) + t for t in md.ftrace)


def _events(o: _Out, md: _Meta) -> bytes:
    parts = [o.pack("I", len(md.systems))]
    for system, formats in md.systems.items():
        parts.append(system.encode() + b"\0" + o.pack("I", len(formats)))
        parts.extend(o.pack("Q", len(t)) + t for t in formats)
    return b"".join(parts)


def _cstr(s: Union[str, bytes]) -> bytes:
    b = s.encode() if isinstance(s, str) else bytes(s)
    return b.split(b"\0", 1)[0] + b"\0"


def _cpu_size(path: str, page_size: int) -> int:
    """Bytes of whole pages in a spool file; a partial last page is left out."""
    try:
        size = os.stat(path).st_size
    except OSError as e:
        raise VmtraceError(f"{path}: cannot read CPU data: {e.strerror}") from None
    return size - size % page_size


def _copy(o: _Out, path: str, size: int) -> None:
    with open(path, "rb") as src:
        left = size
        while left:
            chunk = src.read(min(_COPY, left))
            if not chunk:
                raise VmtraceError(f"{path}: shrank while being written ({left} bytes missing)")
            o.raw(chunk)
            left -= len(chunk)


def _copy_compressed(o: _Out, codec: Codec, path: str, size: int, chunk_size: int) -> None:
    start = o.tell()
    o.num("I", 0)
    count = 0
    with open(path, "rb") as src:
        left = size
        while left:
            data = src.read(min(chunk_size, left))
            if not data:
                raise VmtraceError(f"{path}: shrank while being written ({left} bytes missing)")
            z = codec.compress(data)
            o.num("II", len(z), len(data))
            o.raw(z)
            left -= len(data)
            count += 1
    o.patch(start, "I", count)


# ---------------------------------------------------------------- options

# At most this many CPUs: CPU numbers are checked to be below 65536, and a v6 file
# writes a 16-byte table entry per CPU up front.
MAX_CPUCOUNT = 65536
# meta.json may come from a guest: only names, tokens and numbers are taken from it.
_CLOCK_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}\Z")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+~-]{0,63}\Z")
_STAT_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,31}\Z")


def _meta_token(m: Mapping, key: str, pattern: re.Pattern) -> Optional[str]:
    v = m.get(key)
    return v if isinstance(v, str) and pattern.match(v) else None


class _Settings:
    """Everything the options say: the caller's options, then what meta.json may supply.

    meta.json supplies only checked structure and single words (clock name, hostname,
    kernel release, machine, agent version, per-CPU counters); the options that change
    how a reader shows the trace as a whole (``uname``, ``trace_clock``, ``date``,
    ``offset``, ``hook``) come from the caller alone. A guest writes its own meta.json:
    it must not be able to name itself another machine or shift its timestamps.
    """

    def __init__(self, md: _Meta, options: Mapping[str, OptionValue], cpus: Iterable[int]):
        unknown = set(options) - _KNOWN_OPTIONS
        if unknown:
            raise VmtraceError(f"unknown trace.dat option(s): {', '.join(sorted(unknown))} "
                               f"(known: {', '.join(sorted(_KNOWN_OPTIONS))})")
        m = md.meta

        def opt(key: str):
            v = options.get(key)
            return v.decode("utf-8", "replace") if isinstance(v, bytes) else v

        def word(key: str, pattern: re.Pattern = _TOKEN_RE):
            v = opt(key)
            return v if v is not None else _meta_token(m, key, pattern)

        text = opt("trace_clock")
        clock = word("clock", _CLOCK_RE)
        if text and not clock:
            clock = parse_clock(str(text))
        if clock and not text:
            text = f"[{clock}]"
        self.clock: Optional[str] = clock
        self.clock_text: Optional[str] = text
        uname = opt("uname")
        if not uname:
            host, kernel = word("hostname"), word("kernel")
            if host or kernel:
                uname = f"Linux {host or 'unknown'} {kernel or 'unknown'}"
                if word("machine"):
                    uname += f" {word('machine')}"
        self.uname: Optional[str] = uname
        agent = m.get("agent") if isinstance(m.get("agent"), dict) else {}
        agent_version = _meta_token(agent, "version", _TOKEN_RE)
        self.version = str(options.get("version") or (
            f"{WRITER_VERSION} (agent {agent_version})" if agent_version else WRITER_VERSION))
        present = list(cpus)
        nr = options.get("cpucount", m.get("nr_cpus"))
        if nr is not None and (isinstance(nr, bool) or not isinstance(nr, int)):
            try:
                nr = int(nr)  # type: ignore[arg-type]
            except (TypeError, ValueError):
                raise VmtraceError(f"cpucount {str(nr)[:40]!r} is not a number") from None
        self.cpucount = max([nr or 0] + [c + 1 for c in present])
        if not 0 <= self.cpucount <= MAX_CPUCOUNT:
            raise VmtraceError(f"cpucount {self.cpucount} is out of range (0..{MAX_CPUCOUNT})")
        stat = options.get("cpustat")
        if stat is None and isinstance(m.get("stats"), dict):
            from vmtrace.format.rawdir import _format_cpustat
            stat = [_format_cpustat(str(c), _counters(s)) for c, s in sorted(
                m["stats"].items(), key=lambda kv: (len(str(kv[0])), str(kv[0])))
                if isinstance(s, dict) and _TOKEN_RE.match(str(c))]
        if isinstance(stat, (str, bytes)):
            s = stat.decode("utf-8", "replace") if isinstance(stat, bytes) else stat
            stat = [p for p in re.split(r"(?m)^(?=CPU: )", s) if p.strip()]
        self.cpustat: list[str] = list(stat or [])
        self.date, self.offset, self.hook = opt("date"), opt("offset"), opt("hook")
        self.traceid = options.get("traceid")

    def options(self, o: _Out) -> list[tuple[int, bytes]]:
        """The informational options, in the order trace-cmd writes them."""
        out = []
        if self.date:
            out.append((OPT_DATE, _cstr(str(self.date))))
        if self.offset:
            out.append((OPT_OFFSET, _cstr(str(self.offset))))
        if self.clock_text:
            out.append((OPT_TRACECLOCK, _cstr(self.clock_text)))
        if self.uname:
            out.append((OPT_UNAME, _cstr(self.uname)))
        out.append((OPT_VERSION, _cstr(self.version)))
        if self.hook:
            out.append((OPT_HOOK, _cstr(str(self.hook))))
        if self.traceid is not None:
            try:
                out.append((OPT_TRACEID, o.pack("Q", int(self.traceid, 0) if isinstance(
                    self.traceid, str) else int(self.traceid))))
            except (ValueError, struct.error):
                raise VmtraceError(f"traceid {self.traceid!r} is not a 64-bit number") from None
        out.append((OPT_CPUCOUNT, o.pack("I", self.cpucount)))
        out.extend((OPT_CPUSTAT, _cstr(s)) for s in self.cpustat)
        return out


def _counters(st: Mapping) -> dict:
    """A CPU's counters from meta.json, numbers only: they are printed into CPUSTAT."""
    return {k: v for k, v in st.items()
            if isinstance(k, str) and _STAT_KEY_RE.match(k) and type(v) is int}


def _write_options(o: _Out, opts: list[tuple[int, bytes]], *, v7: bool, next_offset: int = 0) -> None:
    for oid, data in opts:
        o.num("HI", oid, len(data))
        o.raw(data)
    if v7:
        o.num("HIQ", OPT_DONE, 8, next_offset)
    else:
        o.num("H", OPT_DONE)


# ---------------------------------------------------------------- the writer

BufferSpec = tuple[str, Mapping[int, str]]


def write_tracedat(path: str | os.PathLike, metadata: Mapping[str, bytes],
                   cpu_files: Mapping[int, str], *, version: int = 7,
                   compression: Optional[str] = "zstd",
                   options: Mapping[str, OptionValue] = {}, buffer_name: str = "",
                   extra_buffers: Mapping[str, Mapping[int, str]] = {}) -> str:
    """Write a trace.dat from raw-directory metadata and per-CPU page files.

    ``metadata`` uses the raw directory's names (header_page, events/SYS/EV/format, ...,
    meta.json); meta.json supplies defaults (clock, hostname, kernel, nr_cpus, page size,
    long size, endianness, agent stats) that ``options`` overrides. ``cpu_files`` maps
    CPU number -> spool file of whole pages; the data goes into the buffer called
    ``buffer_name`` ("" is the top buffer), and ``extra_buffers`` adds more named
    buffers (name -> cpu files). ``compression`` is "zstd", "zlib" or None, for v7 only.
    The file is written to a temporary name and renamed into place when complete.
    """
    if version not in (6, 7):
        raise VmtraceError(f"trace.dat version {version} cannot be written (6 or 7)")
    if version == 6 and compression not in (None, "none"):
        compression = None   # v6 has no compression; v6 is asked for to be plain
    codec = get_codec(compression) if compression not in (None, "none") else None
    md = _Meta(metadata)
    m = md.meta
    page_size = int(m.get("page_size", 4096))
    long_size = int(m.get("long_size", 8))
    endian = ">" if m.get("endian") == "big" else "<"
    if page_size <= 0 or page_size & (page_size - 1) or long_size not in (4, 8):
        raise VmtraceError(f"bad page size {page_size} or long size {long_size} in meta.json")
    buffers: list[BufferSpec] = [(buffer_name, cpu_files)]
    for name, files in extra_buffers.items():
        buffers.append((name, files))
    names = [b[0] for b in buffers]
    if len(set(names)) != len(names):
        raise VmtraceError(f"buffer names repeat: {names}")
    for name, files in buffers:
        for cpu in files:
            if not isinstance(cpu, int) or cpu < 0 or cpu > 65535:
                raise VmtraceError(f"buffer {name!r}: bad CPU number {cpu!r}")
    settings = _Settings(md, options, [c for _, f in buffers for c in f])
    if "" not in names:
        buffers.insert(0, ("", {}))     # trace-cmd expects the top buffer to be described

    final = os.fspath(path)
    tmp = f"{final}.tmp{os.getpid()}"
    try:
        with open(tmp, "wb") as f:
            o = _Out(f, endian)
            o.raw(MAGIC + str(version).encode() + b"\0")
            o.raw(bytes([0 if endian == "<" else 1, long_size]))
            o.num("I", page_size)
            if version == 7:
                _write_v7(o, md, settings, codec, buffers, page_size)
            else:
                _write_v6(o, md, settings, buffers, page_size)
        os.replace(tmp, final)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    return final


class _Strings:
    """Section descriptions, stored once in a strings section at the end (v7)."""

    def __init__(self) -> None:
        self.data = bytearray()

    def add(self, s: str) -> int:
        at = len(self.data)
        self.data += s.encode() + b"\0"
        return at


def _section(o: _Out, strings: _Strings, sid: int, desc: str, body: bytes,
             codec: Optional[Codec]) -> int:
    at = o.tell()
    if codec is not None:
        z = codec.compress(body)
        payload = o.pack("II", len(z), len(body)) + z
        o.num("HHIQ", sid, SEC_FL_COMPRESS, strings.add(desc), len(payload))
        o.raw(payload)
    else:
        o.num("HHIQ", sid, 0, strings.add(desc), len(body))
        o.raw(body)
    return at


def _write_v7(o: _Out, md: _Meta, st: _Settings, codec: Optional[Codec],
              buffers: list[BufferSpec], page_size: int) -> None:
    o.raw(_cstr(codec.name if codec else "none") + _cstr(codec.version if codec else ""))
    options_ptr = o.tell()
    o.num("Q", 0)
    strings = _Strings()
    opts: list[tuple[int, bytes]] = []
    for sid, desc, body in (
            (OPT_HEADER_INFO, "headers", _header_info(o, md)),
            (OPT_FTRACE_EVENTS, "ftrace events", _ftrace(o, md)),
            (OPT_EVENT_FORMATS, "events format", _events(o, md)),
            (OPT_KALLSYMS, "kallsyms", o.pack("I", len(md.kallsyms)) + md.kallsyms),
            (OPT_PRINTK, "printk", o.pack("I", len(md.printk)) + md.printk),
            (OPT_CMDLINES, "command lines", o.pack("Q", len(md.cmdlines)) + md.cmdlines)):
        opts.append((sid, o.pack("Q", _section(o, strings, sid, desc, body, codec))))
    opts.extend(st.options(o))
    for name, files in buffers:
        at = o.tell()
        flags = SEC_FL_COMPRESS if codec else 0
        o.num("HHI", OPT_BUFFER, flags, strings.add(f"buffer flyrecord {name}"))
        size_at = o.tell()
        o.num("Q", 0)
        start = o.tell()
        table = []
        for cpu in sorted(files):
            size = _cpu_size(files[cpu], page_size)
            o.align(page_size)
            off = o.tell()
            if size and codec:
                _copy_compressed(o, codec, files[cpu], size, PAGES_PER_CHUNK * page_size)
            elif size:
                _copy(o, files[cpu], size)
            table.append((cpu, off, o.tell() - off))
        o.patch(size_at, "Q", o.tell() - start)
        data = (o.pack("Q", at) + _cstr(name) + _cstr(st.clock or "local")
                + o.pack("II", page_size, len(table))
                + b"".join(o.pack("IQQ", cpu, off, size) for cpu, off, size in table))
        opts.append((OPT_BUFFER, data))
    first_options = o.tell()
    o.num("HHI", OPT_DONE, 0, strings.add("options"))
    size_at = o.tell()
    o.num("Q", 0)
    start = o.tell()
    _write_options(o, opts, v7=True)
    o.patch(size_at, "Q", o.tell() - start)
    _section(o, strings, OPT_STRINGS, "strings", bytes(strings.data) + b"strings\0", codec)
    o.patch(options_ptr, "Q", first_options)


def _write_v6(o: _Out, md: _Meta, st: _Settings, buffers: list[BufferSpec], page_size: int) -> None:
    o.raw(_header_info(o, md))
    o.raw(_ftrace(o, md))
    o.raw(_events(o, md))
    o.num("I", len(md.kallsyms))
    o.raw(md.kallsyms)
    o.num("I", len(md.printk))
    o.raw(md.printk)
    o.num("Q", len(md.cmdlines))
    o.raw(md.cmdlines)
    cpus = st.cpucount
    for name, files in buffers:
        if any(c >= cpus for c in files):
            raise VmtraceError(f"buffer {name!r}: CPU numbers must be below the CPU count {cpus}")
    o.num("I", cpus)
    o.raw(b"options  \0")
    opts = st.options(o)
    if not st.clock_text:
        opts.insert(0, (OPT_TRACECLOCK, _cstr("[local]")))
    clock_text = _cstr(st.clock_text or "[local]")
    # An instance's BUFFER option points at its flyrecord table, written further on.
    patch_at: dict[str, int] = {}
    for oid, data in opts:
        o.num("HI", oid, len(data))
        o.raw(data)
    for name, _ in buffers:
        if name:
            o.num("HI", OPT_BUFFER, 8 + len(_cstr(name)))
            patch_at[name] = o.tell()
            o.num("Q", 0)
            o.raw(_cstr(name))
    o.num("H", OPT_DONE)
    tables = {}
    for name, _ in buffers:
        if name:
            o.patch(patch_at[name], "Q", o.tell())
        o.raw(b"flyrecord\0")
        tables[name] = o.tell()
        o.raw(bytes(16 * cpus))
        o.num("Q", len(clock_text))
        o.raw(clock_text)
    for name, files in buffers:
        for cpu in sorted(files):
            size = _cpu_size(files[cpu], page_size)
            o.align(page_size)
            off = o.tell()
            if size:
                _copy(o, files[cpu], size)
            o.patch(tables[name] + 16 * cpu, "QQ", off if size else 0, size)
