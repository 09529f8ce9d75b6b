"""The trace.dat reader against real files from this machine, with trace-cmd as the oracle.

A fresh v7 (zstd) trace is recorded from a private tracefs instance (conftest's
real_trace), converted to v6 by trace-cmd, and both are read: what we find must match
what ``trace-cmd dump`` says is in the file, and the page data of both versions must be
byte-identical (v6 stores it raw, v7 in compressed chunks).
"""
from __future__ import annotations

import hashlib
import re
import subprocess
from pathlib import Path

import pytest

import realtrace
from paths import DATA
from vmtrace.errors import FormatError
from vmtrace.format.tracedat_read import open_tracedat, parse_clock

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


@pytest.fixture(scope="module")
def v6_trace(real_trace, tmp_path_factory) -> Path:
    return realtrace.convert_v6(real_trace, tmp_path_factory.mktemp("v6") / "trace6.dat")


def _dump(path: Path, *args: str) -> str:
    return subprocess.run(["trace-cmd", "dump", *args, "-i", str(path)], check=True,
                          capture_output=True, timeout=60).stdout.decode(errors="replace")


def _digest(src) -> dict:
    out = {}
    for b in src.buffers:
        for c in b.cpus:
            h = hashlib.sha256()
            n = 0
            for page in c.pages():
                assert len(page) == src.page_size
                h.update(page)
                n += 1
            assert n * src.page_size >= c.size
            out[(b.name, c.cpu)] = (n, h.hexdigest()) if n else None
    return {k: v for k, v in out.items() if v}


def test_v7_matches_trace_cmd_dump(real_trace):
    summary = _dump(real_trace, "--summary")
    with open_tracedat(real_trace) as src:
        assert src.version == 7
        assert src.endian == "<" and src.long_size == 8
        assert f"{src.page_size}\t[Page size, bytes]" in summary
        assert f"{src.compression}\t[Compression algorithm]" in summary
        assert f"[Header page, {len(src.header_page)} bytes]" in summary
        assert f"[Header event, {len(src.header_event)} bytes]" in summary
        assert f"[Ftrace format, {len(src.ftrace_formats)} events]" in summary
        systems = {s for s, _ in src.event_formats}
        assert f"[Events format, {len(systems)} systems]" in summary
        assert f"[Kallsyms, {len(src.kallsyms)} bytes]" in summary
        assert f"[Trace printk, {len(src.printk_formats)} bytes]" in summary
        assert f"[Saved command lines, {len(src.cmdlines)} bytes]" in summary
        assert src.header_page.startswith(b"\tfield: u64 timestamp;")
        assert b"name: sched_switch" in b"".join(t for s, t in src.event_formats if s == "sched")
        # Buffers, clocks and per-CPU extents as trace-cmd lists them.
        fly = _dump(real_trace, "--flyrecord")
        listed = re.findall(r'\[Section 3 @ \d+: "buffer flyrecord ([^"]*)"', fly)
        assert [b.name for b in src.buffers] == listed
        extents = [tuple(map(int, m)) for m in re.findall(r"^\s+(\d+) (\d+)\t(\d+)\t\[id", fly, re.M)]
        ours = [(c.cpu, c.offset) for b in src.buffers for c in b.cpus]
        assert ours == [(cpu, off) for cpu, off, _ in extents]
        assert all(b.clock == "local" for b in src.buffers)
        # Options as trace-cmd's own dump decodes them.
        opts = _dump(real_trace, "--options")
        assert src.options["uname"] in opts
        assert src.options["version"] in opts
        assert src.options["clock"] == "local"
        assert src.options["cpucount"] == src.nr_cpus >= 1
        assert len(src.options["cpustat"]) == opts.count("[Option CPUSTAT")
        report_head = realtrace.trace_cmd_report(real_trace).splitlines()[0]
        assert report_head == f"cpus={src.nr_cpus}"
        data = _digest(src)
        assert data, "the recording should hold some pages"


def test_v6_and_v7_hold_identical_pages(real_trace, v6_trace):
    with open_tracedat(real_trace) as s7, open_tracedat(v6_trace) as s6:
        assert s6.version == 6 and s6.compression == "none"
        assert s6.header_page == s7.header_page and s6.header_event == s7.header_event
        assert s6.event_formats == s7.event_formats
        assert s6.ftrace_formats == s7.ftrace_formats
        assert (s6.kallsyms, s6.printk_formats, s6.cmdlines) == (s7.kallsyms, s7.printk_formats, s7.cmdlines)
        assert s6.nr_cpus == s7.nr_cpus
        assert s6.options["cpustat"] == s7.options["cpustat"]
        assert [b.name for b in s6.buffers if any(c.size for c in b.cpus)] == \
               [b.name for b in s7.buffers if any(c.size for c in b.cpus)]
        assert _digest(s6) == _digest(s7)
        assert s6.buffers[0].clock == "local"


def test_pages_are_views_that_can_be_dropped(real_trace):
    src = open_tracedat(real_trace)
    buf = next(b for b in src.buffers if b.cpus and b.cpus[0].size)
    it = buf.cpus[0].pages()
    first = bytes(next(it))
    assert len(first) == src.page_size
    src.close()   # with a page view still alive: must not raise
    src.close()


def test_parse_clock():
    assert parse_clock("[local] global counter") == "local"
    assert parse_clock("local [global] counter\n") == "global"
    assert parse_clock("x86-tsc") == "x86-tsc"
    assert parse_clock("") is None


@pytest.mark.parametrize("blob, what", [
    (b"", "empty file"),
    (b"\x17\x08\x44tracinX6\0", "bad magic"),
    (b"\x17\x08\x44tracing9\0\0\x08", "unsupported trace.dat version"),
    (b"\x17\x08\x44tracing6\0\x05\x08", "endian flag"),
    (b"\x17\x08\x44tracing6\0\0\x03", "long size"),
    (b"\x17\x08\x44tracing6\0\0\x08\x00\x10\x00\x00header_pag", "header_page tag"),
    (b"\x17\x08\x44tracing7\0\0\x08\x00\x10\x00\x00lz4\x001.0\0" + bytes(8), "unknown compression"),
])
def test_bad_headers_name_the_problem(tmp_path, blob, what):
    p = tmp_path / "bad.dat"
    p.write_bytes(blob)
    with pytest.raises(FormatError) as ei:
        open_tracedat(p)
    assert what in str(ei.value) and str(p) in str(ei.value)


def test_chunks_hold_the_same_bytes_as_pages(real_trace, v6_trace, tmp_path):
    """chunks() (pread into fresh buffers) and pages() agree, for v7 (zstd), v6 and v7
    uncompressed; and decoding CPUs from two threads at once is safe."""
    none = tmp_path / "none.dat"
    subprocess.run(["trace-cmd", "convert", "--compression", "none", "-i", str(real_trace),
                    "-o", str(none)], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    for path in (real_trace, v6_trace, none):
        with open_tracedat(path) as src:
            for b in src.buffers:
                for c in b.cpus:
                    paged = b"".join(bytes(p) for p in c.pages())
                    for size in (src.page_size, 3 * src.page_size + 5, 1 << 20):
                        chunks = list(c.chunks(size))
                        assert all(len(x) % src.page_size == 0 for x in chunks)
                        assert b"".join(chunks) == paged
    from concurrent.futures import ThreadPoolExecutor
    import vmtrace
    with vmtrace.open(real_trace) as tr:
        one = {c: [b.ts.copy() for b in tr.batches(c)] for c in tr.cpus()}
        with ThreadPoolExecutor(2) as pool:
            two = dict(zip(tr.cpus(), pool.map(lambda c: [b.ts.copy() for b in tr.batches(c)],
                                               tr.cpus())))
    assert {c: [x.tolist() for x in v] for c, v in one.items()} == \
           {c: [x.tolist() for x in v] for c, v in two.items()}


def test_short_cmdlines_section_is_read_like_trace_cmd(tmp_path):
    """A v7 cmdlines section declaring more bytes than it holds (trace-cmd's own race)."""
    import struct

    from vmtrace.format.tracedat_write import write_tracedat
    from vmtrace.sources import open_source, source_metadata

    src_path = DATA / "tracedat_small_v7.dat"
    with open_source(src_path) as src:
        md = source_metadata(src)
    cmdlines = md["saved_cmdlines"]
    out = tmp_path / "short.dat"
    write_tracedat(str(out), md, {}, version=7, compression=None)
    data = bytearray(out.read_bytes())
    # the cmdlines section: u64 size, then the text; claim 6 bytes more than stored
    at = data.find(struct.pack("<Q", len(cmdlines)) + cmdlines[:32])
    assert at > 0
    data[at:at + 8] = struct.pack("<Q", len(cmdlines) + 6)
    out.write_bytes(bytes(data))
    with open_source(out) as src:
        assert src.cmdlines == cmdlines
