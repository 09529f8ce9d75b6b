"""open_source: one interface for every input, decided by content, never by file name.

Uses the small committed fixtures (tests/data/tracedat_*, made by
tracedat_make_fixtures.py from a real recording), so it runs without tracefs.
"""
from __future__ import annotations

import json
import shutil

import pytest

from paths import DATA
from vmtrace.errors import FormatError
from vmtrace.format import TraceSource
from vmtrace.format.rawdir import write_rawdir
from vmtrace.sources import open_source, source_metadata

V7 = DATA / "tracedat_small_v7.dat"
V6 = DATA / "tracedat_small_v6.dat"


def _pages(src: TraceSource) -> dict:
    return {(b.name, c.cpu): [bytes(p) for p in c.pages()] for b in src.buffers for c in b.cpus}


def test_fixtures_open_as_the_same_trace():
    with open_source(V7) as s7, open_source(V6) as s6:
        assert (s7.kind, s7.version, s7.compression) == ("tracedat", 7, "zstd")
        assert (s6.kind, s6.version, s6.compression) == ("tracedat", 6, "none")
        for s in (s7, s6):
            assert isinstance(s, TraceSource)
            assert s.endian == "<" and s.long_size == 8 and s.page_size == 4096
            assert s.nr_cpus == 2 and s.options["hostname"] == "fixture"
            assert s.buffers[0].name == "" and s.buffers[0].clock == "local"
        assert _pages(s7) == _pages(s6)
        assert source_metadata(s7) == source_metadata(s6)
        report_head = (DATA / "tracedat_small.report.txt").read_text().splitlines()[0]
        assert report_head == f"cpus={s7.nr_cpus}"


def test_name_does_not_matter(tmp_path):
    odd = tmp_path / "trace.txt"
    shutil.copy(V7, odd)
    with open_source(odd) as s:
        assert s.version == 7


def test_rawdir_made_from_a_trace_reads_the_same(tmp_path):
    with open_source(V7) as s7:
        md = dict(source_metadata(s7))
        md["meta.json"] = json.dumps({"nr_cpus": s7.nr_cpus, "page_size": s7.page_size,
                                      "clock": "local"}).encode()
        pages = _pages(s7)
        write_rawdir(tmp_path / "raw", md, {cpu: b"".join(p) for (_, cpu), p in pages.items()})
    with open_source(tmp_path / "raw") as raw:
        assert raw.kind == "rawdir" and raw.version is None
        assert _pages(raw) == pages
        assert raw.ftrace_formats and raw.event_formats
        assert raw.header_page.startswith(b"\tfield: u64 timestamp;")


@pytest.mark.parametrize("make, msg", [
    (lambda p: p.write_bytes(b"hello world, not a trace"), "bad magic"),
    (lambda p: p.mkdir(), "no metadata"),
    (lambda p: None, "cannot open"),
])
def test_not_a_trace_is_one_line(tmp_path, make, msg):
    p = tmp_path / "input"
    make(p)
    with pytest.raises(FormatError, match=msg) as ei:
        open_source(p)
    assert "\n" not in str(ei.value) and str(p) in str(ei.value)


@pytest.mark.parametrize("version, compression, endian, long_size", [
    (7, "zstd", "little", 8), (7, "zlib", "big", 4), (7, None, "big", 8), (6, None, "big", 4)])
def test_writer_reader_round_trip(tmp_path, version, compression, endian, long_size):
    """Every writer mode, including byte orders and long sizes this host does not have,
    reads back to the same metadata, options and pages (trace-cmd checks the little-endian
    ones in test_tracedat_write)."""
    from vmtrace.format.tracedat_write import write_tracedat
    with open_source(V7) as s7:
        md = dict(source_metadata(s7))
        md["meta.json"] = json.dumps({"endian": endian, "long_size": long_size, "clock": "mono",
                                      "hostname": "g", "kernel": "k", "nr_cpus": 3}).encode()
        pages = _pages(s7)
        for (_, cpu), p in pages.items():
            (tmp_path / f"c{cpu}").write_bytes(b"".join(p))
        out = tmp_path / "rt.dat"
        write_tracedat(out, md, {cpu: str(tmp_path / f"c{cpu}") for (_, cpu) in pages},
                       version=version, compression=compression,
                       options={"cpustat": s7.options["cpustat"], "traceid": "0x1234"})
        with open_source(out) as back:
            assert back.version == version and back.compression == (compression or "none")
            assert back.endian == (">" if endian == "big" else "<") and back.long_size == long_size
            assert back.options["clock"] == "mono" == back.buffers[0].clock
            assert back.options["uname"] == "Linux g k" and back.nr_cpus == 3
            assert back.options["cpustat"] == s7.options["cpustat"]
            assert back.options["traceid"] == 0x1234
            assert source_metadata(back) == source_metadata(s7)
            # v6 has a table entry for every CPU of the count, empty or not
            assert {k: v for k, v in _pages(back).items() if v} == pages


def test_fifo_is_refused_without_blocking(tmp_path):
    import os
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(FormatError, match="not a regular file"):
        open_source(fifo)
    from vmtrace.format.tracedat_read import open_tracedat
    with pytest.raises(FormatError, match="not a regular file"):
        open_tracedat(fifo)
