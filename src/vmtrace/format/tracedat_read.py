"""Reading trace.dat files, versions 6 and 7, as trace-cmd.dat(5) and .v7(5) describe them.

The file is mapped, never read whole: metadata is copied out section by section and CPU
data stays in the mapping (or, when compressed, is inflated chunk by chunk on demand), so
opening a 1 GB trace costs a few megabytes. Every number in the file is untrusted: each
read is bounds-checked against its section or the file, counts are checked against the
bytes that could hold them before a loop starts, the chain of v7 options sections is
followed with loop detection, and any problem surfaces as one FormatError naming the
file and the byte offset.

Why one module of this size: it is one reader of one file format, whose v6 and v7
paths share the cursor, the section walk and the budget; split apart they would each
need all three (the writer, tracedat_write.py, is the other half).
"""
from __future__ import annotations

import mmap
import os
import re
import stat
import struct
from typing import Iterator, Optional

from vmtrace.errors import FormatError
from vmtrace.format import Buffer, CpuData, TraceSource
from vmtrace.format.compress import MAX_CHUNK, MAX_METADATA_TOTAL, Budget, Codec, get_codec
from vmtrace.format.fileio import read_at, read_chunks, read_pages

MAGIC = b"\x17\x08\x44tracing"

# Option ids (trace-cmd.dat.v7(5), "OPTIONS SECTION"); v6 files use the first ones too.
OPT_DONE, OPT_DATE, OPT_CPUSTAT, OPT_BUFFER, OPT_TRACECLOCK, OPT_UNAME, OPT_HOOK = range(7)
OPT_OFFSET, OPT_CPUCOUNT, OPT_VERSION, OPT_PROCMAPS, OPT_TRACEID, OPT_TIME_SHIFT = range(7, 13)
OPT_GUEST, OPT_TSC2NSEC, OPT_STRINGS, OPT_HEADER_INFO, OPT_FTRACE_EVENTS = range(13, 18)
OPT_EVENT_FORMATS, OPT_KALLSYMS, OPT_PRINTK, OPT_CMDLINES, OPT_BUFFER_TEXT = range(18, 23)
OPT_BTF_FILE, OPT_LAST_BOOT_INFO, OPT_MODULES_FILE = range(23, 26)

SEC_FL_COMPRESS = 1
SECTION_HEADER_SIZE = 16
MAX_OPTION_SECTIONS = 4096      # a longer chain is a loop or an attack
MAX_NAME = 4096                 # longest NUL-terminated string we accept in headers
# A CPU's entry in a buffer costs a reader ~0.5 KB of objects; charged to the metadata
# budget so that v6 BUFFER options, which all share one CPU table, cannot multiply it.
CPU_ENTRY_COST = 512
# Compressed CPU data may declare at most this many times its compressed size (plus one
# chunk): real trace data compresses 4-20x, and what is declared is decoded, so this
# keeps decoding time linear in the file's size. zlib itself cannot exceed 1032x.
MAX_DATA_RATIO = 1024

__all__ = ["TraceDat", "open_tracedat", "decode_options", "parse_clock", "MAGIC"]


class _Cursor:
    """Bounds-checked reads over a window of a buffer.

    ``base`` maps positions to file offsets for error messages; for a decompressed
    section it is the section's offset and ``inflated`` says positions are inside it.
    """

    __slots__ = ("buf", "pos", "end", "source", "endian", "base", "inflated", "what")

    def __init__(self, buf, pos: int, end: int, *, source: str, endian: str, base: int = 0,
                 inflated: bool = False, what: str = ""):
        self.buf = buf
        self.pos = pos
        self.end = min(end, len(buf))
        self.source = source
        self.endian = endian
        self.base = base
        self.inflated = inflated
        self.what = what

    def error(self, msg: str, pos: Optional[int] = None) -> FormatError:
        pos = self.pos if pos is None else pos
        if self.inflated:
            return FormatError(f"{msg} (byte {pos} of the decompressed {self.what} section)",
                               source=self.source, offset=self.base)
        return FormatError(msg, source=self.source, offset=self.base + pos)

    def remaining(self) -> int:
        return self.end - self.pos

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or n > self.end - self.pos:
            raise self.error(f"{what}: needs {n} bytes, only {max(self.end - self.pos, 0)} left"
                             f"{' (truncated file?)' if not self.inflated else ''}")
        out = bytes(self.buf[self.pos:self.pos + n])
        self.pos += n
        return out

    def _num(self, fmt: str, size: int, what: str) -> int:
        if self.end - self.pos < size:
            raise self.error(f"{what}: needs {size} bytes, only {max(self.end - self.pos, 0)} left"
                             f"{' (truncated file?)' if not self.inflated else ''}")
        v = struct.unpack_from(self.endian + fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def u8(self, what: str) -> int:
        return self._num("B", 1, what)

    def u16(self, what: str) -> int:
        return self._num("H", 2, what)

    def u32(self, what: str) -> int:
        return self._num("I", 4, what)

    def u64(self, what: str) -> int:
        return self._num("Q", 8, what)

    def cstr(self, what: str, limit: int = MAX_NAME) -> str:
        stop = min(self.end, self.pos + limit + 1)
        i = bytes(self.buf[self.pos:stop]).find(b"\0")
        if i < 0:
            raise self.error(f"{what}: no terminating NUL within {stop - self.pos} bytes")
        s = bytes(self.buf[self.pos:self.pos + i]).decode("utf-8", "replace")
        self.pos += i + 1
        return s

    def sized(self, size_bytes: int, what: str) -> bytes:
        n = self.u32(what + " size") if size_bytes == 4 else self.u64(what + " size")
        return self.take(n, what)

    def sized_upto(self, size_bytes: int, what: str) -> bytes:
        """Like sized(), but a section that ends early gives what it has.

        trace-cmd sizes saved_cmdlines before reading it, and the kernel's file can
        shrink in between, so real v7 files declare a few bytes more than they hold.
        Only for the last item of a self-delimiting v7 section, where nothing follows.
        """
        n = self.u32(what + " size") if size_bytes == 4 else self.u64(what + " size")
        return self.take(min(n, self.remaining()), what)

    def count(self, what: str, min_item: int) -> int:
        n = self.u32(what)
        if n * min_item > self.remaining():
            raise self.error(f"{what} is {n}, more than the {self.remaining()} bytes left can hold",
                             self.pos - 4)
        return n


# ---------------------------------------------------------------- metadata parsers
# The same layouts appear in v6 (one after another) and in v7 (one per section).

def _parse_header_info(cur: _Cursor) -> tuple[bytes, bytes]:
    out = []
    for name in ("header_page", "header_event"):
        at = cur.pos
        tag = cur.take(len(name) + 1, name + " tag")
        if tag != name.encode() + b"\0":
            raise cur.error(f"expected {name!r} tag, found {tag!r}", at)
        out.append(cur.sized(8, name))
    return out[0], out[1]


def _parse_ftrace(cur: _Cursor) -> list[bytes]:
    n = cur.count("ftrace format count", 8)
    return [cur.sized(8, f"ftrace format {i}") for i in range(n)]


def _parse_events(cur: _Cursor) -> list[tuple[str, bytes]]:
    out = []
    nsys = cur.count("event system count", 5)
    for _ in range(nsys):
        system = cur.cstr("event system name")
        n = cur.count(f"event count of system {system!r}", 8)
        for i in range(n):
            out.append((system, cur.sized(8, f"format {i} of system {system!r}")))
    return out


def _parse_options(cur: _Cursor, v7: bool) -> tuple[list[tuple[int, bytes]], Optional[int]]:
    """Options up to DONE; returns them and (v7) the offset of the next options section."""
    opts = []
    while True:
        oid = cur.u16("option id")
        if oid == OPT_DONE and not v7:
            return opts, None
        size = cur.u32(f"size of option {oid}")
        data = cur.take(size, f"option {oid}")
        if oid == OPT_DONE:
            if size != 8:
                raise cur.error(f"DONE option has size {size}, expected 8", cur.pos - size - 6)
            return opts, struct.unpack(cur.endian + "Q", data)[0]
        opts.append((oid, data))


def parse_clock(text: str) -> Optional[str]:
    """The selected clock from a trace_clock file text (``"[local] global ..."``)."""
    m = re.search(r"\[([^\]\s]+)\]", text)
    if m:
        return m.group(1)
    words = text.split()
    return words[0] if len(words) == 1 else None


def _text(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_options(raw: list[tuple[int, bytes]], endian: str) -> dict:
    """Known options by name; everything stays available as (id, bytes) under "raw".

    Keys: date, offset, cpustat (list of texts, in file order; an instance's stats are
    preceded by a "Buffer: NAME" text as trace-cmd writes them), trace_clock (the file
    text) and clock (the selected clock), uname, hostname (second word of uname, where
    the writer puts a guest's name), kernel (third word), version, hook, procmaps,
    traceid, cpucount, tsc2nsec (mult, shift, offset), time_shift (bytes), guest (list
    of {name, trace_id, cpus: [(cpu, host pid)]}), last_boot_info.
    """
    d: dict = {"raw": list(raw), "cpustat": [], "guest": []}
    for oid, data in raw:
        try:
            if oid == OPT_DATE:
                d["date"] = _text(data)
            elif oid == OPT_OFFSET:
                d["offset"] = _text(data)
            elif oid == OPT_CPUSTAT:
                d["cpustat"].append(_text(data))
            elif oid == OPT_TRACECLOCK:
                d["trace_clock"] = _text(data)
                d["clock"] = parse_clock(d["trace_clock"])
            elif oid == OPT_UNAME:
                d["uname"] = _text(data)
                words = d["uname"].split()
                if len(words) >= 3:
                    d["hostname"], d["kernel"] = words[1], words[2]
            elif oid == OPT_VERSION:
                d["version"] = _text(data)
            elif oid == OPT_HOOK:
                d.setdefault("hook", []).append(_text(data))
            elif oid == OPT_PROCMAPS:
                d["procmaps"] = _text(data)
            elif oid == OPT_TRACEID and len(data) >= 8:
                d["traceid"] = struct.unpack_from(endian + "Q", data)[0]
            elif oid == OPT_CPUCOUNT and len(data) >= 4:
                d["cpucount"] = struct.unpack_from(endian + "I", data)[0]
            elif oid == OPT_TSC2NSEC and len(data) >= 16:
                d["tsc2nsec"] = struct.unpack_from(endian + "IIQ", data)
            elif oid == OPT_TIME_SHIFT:
                d["time_shift"] = data
            elif oid == OPT_GUEST:
                d["guest"].append(_decode_guest(data, endian))
            elif oid == OPT_LAST_BOOT_INFO:
                d["last_boot_info"] = _text(data)
        except (struct.error, ValueError, IndexError):
            continue    # a malformed informational option is skipped, as trace-cmd does
    return d


def _decode_guest(data: bytes, endian: str) -> dict:
    name, _, rest = data.partition(b"\0")
    trace_id, ncpu = struct.unpack_from(endian + "QI", rest)
    ncpu = min(ncpu, (len(rest) - 12) // 8)
    cpus = [struct.unpack_from(endian + "II", rest, 12 + 8 * i) for i in range(ncpu)]
    return {"name": name.decode("utf-8", "replace"), "trace_id": trace_id, "cpus": cpus}


# ---------------------------------------------------------------- the source

class TraceDat(TraceSource):
    """A trace.dat file (v6 or v7) opened for reading; see TraceSource for the fields."""

    kind = "tracedat"

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        self.path = os.fspath(path)
        self._codec: Optional[Codec] = None
        self.compression = "none"
        self.compression_version = ""
        self._mm: Optional[mmap.mmap] = None
        self._fd: Optional[int] = None
        # What this file may make us keep, summed over every section and option (the
        # per-block codec limit alone let a chain of blocks add up to gigabytes).
        self._budget = Budget(MAX_METADATA_TOTAL, "metadata kept from this file")
        self._extents: list[tuple[int, int, str, int]] = []   # CPU data in the file
        try:
            if os.path.exists(self.path) and not stat.S_ISREG(os.stat(self.path).st_mode):
                raise FormatError("not a regular file", source=self.path)
            with open(self.path, "rb") as f:
                self.file_size = os.fstat(f.fileno()).st_size
                if self.file_size == 0:
                    raise FormatError("empty file, not a trace.dat", source=self.path, offset=0)
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
                # CPU data is read with pread through this descriptor, not through the
                # mapping: mapped pages stay resident once touched (see fileio.py).
                self._fd = os.dup(f.fileno())
        except OSError as e:
            raise FormatError(f"cannot open: {e.strerror}", source=self.path) from None
        try:
            self._parse()
        except BaseException:
            self.close()
            raise
        _drop_resident(self._mm)

    # -- top level
    def _cur(self, pos: int, end: Optional[int] = None) -> _Cursor:
        return _Cursor(self._mm, pos, self.file_size if end is None else end,
                       source=self.path, endian=self.endian)

    def _parse(self) -> None:
        mm = self._mm
        if bytes(mm[:10]) != MAGIC:
            raise FormatError("bad magic, not a trace.dat file", source=self.path, offset=0)
        cur = self._cur(10)
        ver = cur.cstr("version string", 16)
        if ver not in ("6", "7"):
            raise FormatError(f"unsupported trace.dat version {ver!r} (6 and 7 are known)",
                              source=self.path, offset=10)
        self.version = int(ver)
        e = cur.u8("endian flag")
        if e not in (0, 1):
            raise cur.error(f"endian flag is {e}, expected 0 or 1", cur.pos - 1)
        self.endian = cur.endian = "<" if e == 0 else ">"
        self.long_size = cur.u8("long size")
        if self.long_size not in (4, 8):
            raise cur.error(f"long size is {self.long_size}, expected 4 or 8", cur.pos - 1)
        self.page_size = cur.u32("page size")
        if not (256 <= self.page_size <= (1 << 24)) or self.page_size & (self.page_size - 1):
            raise cur.error(f"page size {self.page_size} is not a power of two in 256..16M",
                            cur.pos - 4)
        if self.version == 6:
            self._parse_v6(cur)
        else:
            self._parse_v7(cur)
        self._check_overlaps()
        self.options = decode_options(self._raw_options, self.endian)
        cpucount = self.options.get("cpucount")
        present = [c.cpu + 1 for b in self.buffers for c in b.cpus]
        if self.version == 6:
            self.nr_cpus = self._v6_cpus
        else:
            self.nr_cpus = cpucount if cpucount else max(present, default=0)

    def _check_overlaps(self) -> None:
        """Refuse CPU data that shares bytes with other CPU data.

        trace-cmd never writes that; a crafted table could point every CPU (of every
        buffer) at the same region, so that decoding costs N times the file's size.
        """
        extents = sorted(self._extents)
        for (_, end, bname, cpu), (start, _, bname2, cpu2) in zip(extents, extents[1:]):
            if start < end:
                raise FormatError(f"buffer {bname2!r} CPU {cpu2}'s data overlaps buffer "
                                  f"{bname!r} CPU {cpu}'s", source=self.path, offset=start)

    # -- version 6: one sequential header, then flyrecord tables
    def _parse_v6(self, cur: _Cursor) -> None:
        self.header_page, self.header_event = _parse_header_info(cur)
        self.ftrace_formats = _parse_ftrace(cur)
        self.event_formats = _parse_events(cur)
        self.kallsyms = cur.sized(4, "kallsyms")
        self.printk_formats = cur.sized(4, "printk formats")
        self.cmdlines = cur.sized(8, "saved cmdlines")
        cpus = cur.u32("CPU count")
        self._raw_options = []
        kind = self._v6_data_kind(cur)
        # An option may change the CPU count; the flyrecord tables then follow it.
        for oid, data in self._raw_options:
            if oid == OPT_CPUCOUNT and len(data) >= 4:
                cpus = struct.unpack(self.endian + "I", data[:4])[0]
        if cpus * 16 > cur.remaining():
            raise cur.error(f"CPU count {cpus} does not fit in the file")
        self._v6_cpus = cpus
        has_clock = any(oid == OPT_TRACECLOCK for oid, _ in self._raw_options)
        if kind == "latency":
            raise cur.error("latency (text) trace.dat files are not supported")
        top = self._v6_flyrecord(cur, "", cpus, has_clock)
        self.buffers = [top]
        for oid, data in self._raw_options:
            if oid != OPT_BUFFER:
                continue
            oc = _Cursor(data, 0, len(data), source=self.path, endian=self.endian,
                         base=0, inflated=True, what="BUFFER option")
            off = oc.u64("buffer offset")
            name = oc.cstr("buffer name")
            bc = self._cur(off)
            if off >= self.file_size:
                raise FormatError(f"buffer {name!r} starts at {off}, past the end of the file",
                                  source=self.path, offset=off)
            if self._v6_data_kind(bc, options_allowed=False) != "flyrecord":
                raise bc.error(f"buffer {name!r} is not flyrecord data")
            self.buffers.append(self._v6_flyrecord(bc, name, cpus, has_clock))

    def _v6_data_kind(self, cur: _Cursor, options_allowed: bool = True) -> str:
        at = cur.pos
        tag = cur.take(10, "data kind tag")
        if tag == b"options  \0" and options_allowed:
            self._raw_options, _ = _parse_options(cur, v7=False)
            at = cur.pos
            tag = cur.take(10, "data kind tag")
        if tag == b"flyrecord\0":
            return "flyrecord"
        if tag == b"latency  \0":
            return "latency"
        raise cur.error(f"expected 'flyrecord' or 'latency' tag, found {tag!r}", at)

    def _v6_flyrecord(self, cur: _Cursor, name: str, cpus: int, has_clock: bool) -> Buffer:
        self._budget.take(cpus * CPU_ENTRY_COST, source=self.path, offset=cur.pos)
        entries = []
        for cpu in range(cpus):
            off = cur.u64(f"CPU {cpu} data offset")
            size = cur.u64(f"CPU {cpu} data size")
            entries.append((cpu, off, size))
        clock = None
        if has_clock:
            clock = parse_clock(cur.sized(8, "trace clock").decode("utf-8", "replace"))
        buf = Buffer(name=name, clock=clock, page_size=self.page_size)
        buf.cpus = [self._raw_cpu(name, cpu, off, size) for cpu, off, size in entries]
        return buf

    # -- version 7: sections located by options
    def _parse_v7(self, cur: _Cursor) -> None:
        self.compression = cur.cstr("compression name", 64)
        self.compression_version = cur.cstr("compression version", 64)
        if self.compression != "none":
            self._codec = get_codec(self.compression, source=self.path, offset=cur.pos)
        first = cur.u64("options offset")
        self._raw_options = []
        seen = set()
        nxt = first
        while nxt:
            if nxt in seen or len(seen) >= MAX_OPTION_SECTIONS:
                raise FormatError("options sections form a loop", source=self.path, offset=nxt)
            seen.add(nxt)
            data, _, flags = self._section(nxt, OPT_DONE, "options")
            oc = _Cursor(data, 0, len(data), source=self.path, endian=self.endian,
                         base=nxt + SECTION_HEADER_SIZE if not flags & SEC_FL_COMPRESS else nxt,
                         inflated=bool(flags & SEC_FL_COMPRESS), what="options")
            opts, nxt = _parse_options(oc, v7=True)
            self._raw_options.extend(opts)

        sections = {}
        for oid, data in self._raw_options:
            if OPT_HEADER_INFO <= oid <= OPT_CMDLINES:
                if len(data) != 8:
                    raise FormatError(f"section option {oid} has size {len(data)}, expected 8",
                                      source=self.path, offset=first)
                sections[oid] = struct.unpack(self.endian + "Q", data)[0]
        if OPT_HEADER_INFO not in sections:
            raise FormatError("no HEADER_INFO section (header_page/header_event)",
                              source=self.path, offset=first)
        parsers = {
            OPT_HEADER_INFO: ("headers", _parse_header_info),
            OPT_FTRACE_EVENTS: ("ftrace events", _parse_ftrace),
            OPT_EVENT_FORMATS: ("events format", _parse_events),
            OPT_KALLSYMS: ("kallsyms", lambda c: c.sized(4, "kallsyms")),
            OPT_PRINTK: ("printk", lambda c: c.sized(4, "printk formats")),
            OPT_CMDLINES: ("command lines", lambda c: c.sized_upto(8, "saved cmdlines")),
        }
        results = {}
        for oid, off in sections.items():
            what, parse = parsers[oid]
            data, data_off, flags = self._section(off, oid, what)
            inflated = bool(flags & SEC_FL_COMPRESS)
            sc = _Cursor(data, 0, len(data), source=self.path, endian=self.endian,
                         base=off if inflated else data_off, inflated=inflated, what=what)
            results[oid] = parse(sc)
        self.header_page, self.header_event = results[OPT_HEADER_INFO]
        self.ftrace_formats = results.get(OPT_FTRACE_EVENTS, [])
        self.event_formats = results.get(OPT_EVENT_FORMATS, [])
        self.kallsyms = results.get(OPT_KALLSYMS, b"")
        self.printk_formats = results.get(OPT_PRINTK, b"")
        self.cmdlines = results.get(OPT_CMDLINES, b"")

        top, others = [], []
        names = set()
        for oid, data in self._raw_options:
            if oid == OPT_BUFFER:
                b = self._v7_buffer(data)
                if b.name in names:
                    raise FormatError(f"buffer {b.name!r} is described twice", source=self.path,
                                      offset=first)
                names.add(b.name)
                (top if b.name == "" else others).append(b)
        self.buffers = top + others

    def _section(self, off: int, want_id: int, what: str) -> tuple[bytes, int, int]:
        """(contents, file offset of the contents, flags) of the section at ``off``."""
        if off + SECTION_HEADER_SIZE > self.file_size:
            raise FormatError(f"{what} section header at {off} is past the end of the file",
                              source=self.path, offset=off)
        cur = self._cur(off)
        sid = cur.u16("section id")
        flags = cur.u16("section flags")
        cur.u32("section description")
        size = cur.u64("section size")
        if sid != want_id:
            raise FormatError(f"expected {what} section (id {want_id}), found id {sid}",
                              source=self.path, offset=off)
        if size > cur.remaining():
            raise FormatError(f"{what} section claims {size} bytes, file has {cur.remaining()} left",
                              source=self.path, offset=off)
        data_off = cur.pos
        if not flags & SEC_FL_COMPRESS:
            # sections may overlap one another: copies count against the budget too
            self._budget.take(size, source=self.path, offset=off)
            return bytes(self._mm[data_off:data_off + size]), data_off, flags
        if self._codec is None:
            raise FormatError(f"{what} section is marked compressed in an uncompressed file",
                              source=self.path, offset=off)
        zc = self._cur(data_off, data_off + size)
        zsize = zc.u32(f"{what} compressed size")
        usize = zc.u32(f"{what} uncompressed size")
        blob = zc.take(zsize, f"{what} compressed data")
        return self._codec.decompress(blob, usize, source=self.path, offset=data_off,
                                      budget=self._budget), data_off, flags

    def _v7_buffer(self, data: bytes) -> Buffer:
        oc = _Cursor(data, 0, len(data), source=self.path, endian=self.endian, inflated=True,
                     what="BUFFER option")
        off = oc.u64("buffer section offset")
        name = oc.cstr("buffer name")
        clock = oc.cstr("buffer clock") or None
        page_size = oc.u32("buffer page size")
        if page_size != self.page_size:
            raise FormatError(f"buffer {name!r} has page size {page_size}, file has {self.page_size}",
                              source=self.path, offset=off)
        n = oc.count("buffer CPU count", 20)
        self._budget.take(n * CPU_ENTRY_COST, source=self.path, offset=off)
        entries = [(oc.u32("CPU id"), oc.u64("CPU data offset"), oc.u64("CPU data size"))
                   for _ in range(n)]
        buf = Buffer(name=name, clock=clock, page_size=page_size)
        if not n:
            return buf
        if off + SECTION_HEADER_SIZE > self.file_size:
            raise FormatError(f"buffer {name!r} section is past the end of the file",
                              source=self.path, offset=off)
        hc = self._cur(off)
        sid, flags = hc.u16("section id"), hc.u16("section flags")
        if sid != OPT_BUFFER:
            raise FormatError(f"expected buffer section (id 3) for {name!r}, found id {sid}",
                              source=self.path, offset=off)
        compressed = bool(flags & SEC_FL_COMPRESS) and self._codec is not None
        seen = set()
        for cpu, coff, size in entries:
            if cpu in seen:
                raise FormatError(f"buffer {name!r} lists CPU {cpu} twice", source=self.path, offset=off)
            seen.add(cpu)
            if compressed and size:
                buf.cpus.append(self._zipped_cpu(name, cpu, coff, size))
            else:
                buf.cpus.append(self._raw_cpu(name, cpu, coff, size))
        return buf

    # -- CPU data
    def _check_extent(self, name: str, cpu: int, off: int, size: int) -> None:
        if size and (off > self.file_size or size > self.file_size - off):
            raise FormatError(f"buffer {name!r} CPU {cpu}: {size} bytes at {off} run past the end "
                              f"of the file ({self.file_size} bytes; truncated?)",
                              source=self.path, offset=off)
        if size:
            self._extents.append((off, off + size, name, cpu))

    def _raw_cpu(self, name: str, cpu: int, off: int, size: int) -> CpuData:
        self._check_extent(name, cpu, off, size)
        ps = self.page_size
        src = f"{self.path} CPU {cpu}"

        def pages() -> Iterator[memoryview]:
            yield from read_pages(self._data_fd(), off, size, ps, pad_tail=True, source=src)

        def chunks(max_bytes: int) -> Iterator[bytearray]:
            yield from read_chunks(self._data_fd(), off, size, ps, max_bytes, pad_tail=True,
                                   source=src)

        return CpuData(cpu, size, pages, offset=off, compressed=False, chunker=chunks)

    def _zipped_cpu(self, name: str, cpu: int, off: int, size: int) -> CpuData:
        """Index the chunk headers now (cheap), inflate chunks only while iterating."""
        self._check_extent(name, cpu, off, size)
        # trace-cmd (3.1.6 at least) records a compressed size that leaves out the
        # 4-byte chunk count, so the chunks may run 4 bytes past off + size.
        cur = self._cur(off, off + size + 4)
        n = cur.count(f"buffer {name!r} CPU {cpu} chunk count", 8)
        chunks = []
        total = 0
        for _ in range(n):
            at = cur.pos
            zsize = cur.u32("chunk compressed size")
            usize = cur.u32("chunk uncompressed size")
            if usize > MAX_CHUNK:
                raise cur.error(f"chunk declares {usize} bytes, limit is {MAX_CHUNK}", at)
            if zsize > cur.remaining():
                raise cur.error(f"chunk of {zsize} bytes runs past CPU {cpu}'s data", at)
            chunks.append((at, zsize, usize))
            cur.pos += zsize
            total += usize
        if total > MAX_DATA_RATIO * size + MAX_CHUNK:
            raise FormatError(f"buffer {name!r} CPU {cpu}: {size} compressed bytes declare "
                              f"{total} bytes of pages, more than {MAX_DATA_RATIO} times as many",
                              source=self.path, offset=off)
        ps = self.page_size
        codec = self._codec

        def inflated() -> Iterator[bytes]:
            fd = self._data_fd()
            for at, zsize, usize in chunks:
                blob = bytearray(zsize)
                if read_at(fd, blob, at + 8, source=self.path) != zsize:
                    raise FormatError("compressed chunk runs past the end of the file",
                                      source=self.path, offset=at)
                yield codec.decompress(blob, usize, source=self.path, offset=at,
                                       limit=MAX_CHUNK)

        def pages() -> Iterator[memoryview]:
            rest = b""
            for data in inflated():
                if rest:
                    data = rest + data
                whole = len(data) - len(data) % ps
                view = memoryview(data)
                for p in range(0, whole, ps):
                    yield view[p:p + ps]
                rest = data[whole:]
            if rest:
                yield memoryview(rest + bytes(ps - len(rest)))

        def joined(max_bytes: int) -> Iterator[bytearray]:
            step = max(ps, max_bytes - max_bytes % ps)
            out = bytearray()
            for data in inflated():
                out += data
                if len(out) >= step:
                    whole = len(out) - len(out) % ps
                    rest = out[whole:]
                    del out[whole:]
                    yield out
                    out = rest
            if out:
                if len(out) % ps:
                    out += bytes(ps - len(out) % ps)
                yield out

        return CpuData(cpu, total, pages, offset=off, compressed=True, chunker=joined)

    def _data_fd(self) -> int:
        if self._fd is None:
            raise FormatError("the trace file is closed", source=self.path)
        return self._fd

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)
        mm, self._mm = self._mm, None
        if mm is not None:
            try:
                mm.close()
            except BufferError:
                pass    # a caller still holds a page view; the mapping goes with it


def _drop_resident(mm: Optional[mmap.mmap]) -> None:
    """Unmap the pages parsing touched (metadata is copied out): RSS stays small."""
    if mm is not None and hasattr(mm, "madvise") and hasattr(mmap, "MADV_DONTNEED"):
        try:
            mm.madvise(mmap.MADV_DONTNEED)
        except (OSError, ValueError):
            pass


def open_tracedat(path: str | os.PathLike) -> TraceDat:
    """Open a trace.dat (v6 or v7); FormatError if it is not a readable one."""
    return TraceDat(path)
