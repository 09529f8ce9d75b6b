"""The trace.dat writer, judged by trace-cmd: what we write must report like the original.

A real recording (conftest's real_trace, recorded for this run from a private tracefs
instance) is read with our reader, its pages are spooled to per-CPU files the way the
host recorder holds them, and written again as v7/zstd, v7 uncompressed and v6; each
must give ``trace-cmd report`` output identical, line for line, to the original file's.
zlib output is checked with trace-cmd when this trace-cmd build supports zlib (Debian's
3.1.6 lists only zstd), and always by reading it back with our reader.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

import realtrace
from paths import DATA
from vmtrace.errors import VmtraceError
from vmtrace.format.tracedat_read import open_tracedat
from vmtrace.format.tracedat_write import write_tracedat
from vmtrace.sources import source_metadata

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


def spool(src, out: Path) -> dict[str, dict[int, str]]:
    """Per-buffer {cpu: file} of the source's pages, as a recorder's spool would hold."""
    out.mkdir(parents=True, exist_ok=True)
    bufs = {}
    for b in src.buffers:
        files = {}
        for c in b.cpus:
            fn = out / f"{b.name or 'top'}.cpu{c.cpu}"
            with open(fn, "wb") as f:
                for page in c.pages():
                    f.write(page)
            files[c.cpu] = str(fn)
        bufs[b.name] = files
    return bufs


def trace_cmd_codecs() -> str:
    return subprocess.run(["trace-cmd", "list", "-c"], capture_output=True, timeout=30).stdout.decode()


@pytest.fixture(scope="module")
def spooled(real_trace, tmp_path_factory):
    d = tmp_path_factory.mktemp("spool")
    with open_tracedat(real_trace) as src:
        md = source_metadata(src)
        bufs = spool(src, d)
        opts = {"trace_clock": src.options["trace_clock"], "uname": src.options["uname"],
                "version": src.options["version"], "cpustat": src.options["cpustat"]}
        main = next(n for n, f in bufs.items() if any(os.path.getsize(p) for p in f.values()))
    extra = {n: f for n, f in bufs.items() if n not in (main, "")}
    return d, md, bufs, main, extra, opts


@pytest.mark.parametrize("version, compression", [(7, "zstd"), (7, None), (6, None), (7, "zlib")])
def test_rewrite_reports_identically(real_trace, spooled, version, compression):
    d, md, bufs, main, extra, opts = spooled
    out = d / f"out-v{version}-{compression}.dat"
    write_tracedat(out, md, bufs[main], version=version, compression=compression, options=opts,
                   buffer_name=main, extra_buffers=extra)
    with open_tracedat(out) as back, open_tracedat(real_trace) as orig:
        assert back.version == version
        assert back.compression == (compression or "none")
        assert back.event_formats == orig.event_formats and back.kallsyms == orig.kallsyms
        assert back.options["cpustat"] == orig.options["cpustat"]
        for b in orig.buffers:
            for c in b.cpus:
                if c.size:
                    mine = back.buffer(b.name)
                    cd = next(x for x in mine.cpus if x.cpu == c.cpu)
                    assert [bytes(p) for p in cd.pages()] == [bytes(p) for p in c.pages()]
    if compression == "zlib" and "zlib" not in trace_cmd_codecs():
        return   # read back above; this trace-cmd build cannot read zlib files
    want = realtrace.trace_cmd_report(real_trace)
    got = realtrace.trace_cmd_report(out)
    assert got.count("\n") > 10
    assert got.splitlines() == want.splitlines()
    dump = subprocess.run(["trace-cmd", "dump", "--summary", "-i", str(out)], capture_output=True,
                          timeout=60)
    assert dump.returncode == 0 and b"[Header page, " in dump.stdout


def test_guest_identity_and_agent_stats_reach_trace_cmd(spooled):
    """meta.json's hostname, kernel, clock and per-CPU agent stats become options that
    trace-cmd shows with --uname and --stat; the data goes in the top buffer."""
    d, md, bufs, main, _, _ = spooled
    meta = {"layout": "vmtrace-raw", "layout_version": 1, "kernel": "6.1.0-guest",
            "hostname": "guest1", "nr_cpus": 4, "page_size": 4096, "long_size": 8,
            "endian": "little", "clock": "local", "agent": {"version": "0.1.0"},
            "stats": {"0": {"entries": 0, "overrun": 7, "read_events": 11, "bytes_sent": 4096,
                            "pages_sent": 1, "lost_events": 7}}}
    md = dict(md, **{"meta.json": json.dumps(meta).encode()})
    out = d / "guest.dat"
    write_tracedat(out, md, bufs[main])
    with open_tracedat(out) as src:
        assert src.options["hostname"] == "guest1" and src.options["kernel"] == "6.1.0-guest"
        assert src.options["cpucount"] == 4 == src.nr_cpus
        assert [b.name for b in src.buffers] == [""]
        assert "agent 0.1.0" in src.options["version"]
    uname = realtrace.trace_cmd_report(out, "--uname")
    assert "Linux guest1 6.1.0-guest" in uname
    stat = realtrace.trace_cmd_report(out, "--stat")
    assert "overrun: 7" in stat and "read events: 11" in stat and "lost events: 7" in stat
    report = realtrace.trace_cmd_report(out).splitlines()
    assert report[0] == "cpus=4"
    assert len(report) > 10 and not report[1].startswith(main)


def test_two_buffers_both_reported(spooled):
    """The same pages as top buffer and as an instance: trace-cmd shows each event twice,
    once under the instance's name."""
    d, md, bufs, main, _, opts = spooled
    out = d / "two.dat"
    write_tracedat(out, md, bufs[main], options=opts, extra_buffers={"second": bufs[main]})
    lines = realtrace.trace_cmd_report(out).splitlines()
    second = [ln for ln in lines if ln.startswith("second: ")]
    top = [ln for ln in lines[1:] if not ln.startswith("second: ")]
    assert len(second) > 10 and len(second) == len(top)
    # trace-cmd widens the comm column to fit the buffer name; compare without padding
    assert [ln[len("second: "):].strip() for ln in second] == [ln.strip() for ln in top]
    with open_tracedat(out) as src:
        assert [b.name for b in src.buffers] == ["", "second"]


def test_partial_last_page_is_left_out(spooled, tmp_path):
    _, md, bufs, main, _, opts = spooled
    cpu, path = next((c, p) for c, p in bufs[main].items() if os.path.getsize(p))
    cut = tmp_path / "cut"
    data = Path(path).read_bytes()
    cut.write_bytes(data + data[:100])
    out = tmp_path / "cut.dat"
    write_tracedat(out, md, {cpu: str(cut)}, options=opts, version=6)
    with open_tracedat(out) as src:
        assert src.buffers[0].cpus[cpu].size == len(data)


def test_bad_writer_input_is_one_clear_error(spooled, tmp_path):
    _, md, bufs, main, _, _ = spooled
    with pytest.raises(VmtraceError, match="header_page"):
        write_tracedat(tmp_path / "x.dat", {"saved_cmdlines": b""}, {})
    with pytest.raises(VmtraceError, match="unknown trace.dat option"):
        write_tracedat(tmp_path / "x.dat", md, {}, options={"colour": "blue"})
    with pytest.raises(VmtraceError, match="version 5"):
        write_tracedat(tmp_path / "x.dat", md, {}, version=5)
    with pytest.raises(VmtraceError, match="cannot read CPU data"):
        write_tracedat(tmp_path / "x.dat", md, {0: str(tmp_path / "missing")})
    assert not list(tmp_path.glob("x.dat*")), "a failed write leaves no file behind"


def test_committed_fixtures_report_as_recorded():
    """Both fixtures (written by us, v7 and v6, with dropped events) still read in
    trace-cmd exactly as when they were made."""
    data = DATA
    want = (data / "tracedat_small.report.txt").read_text()
    assert "EVENTS DROPPED]" in want
    for name in ("tracedat_small_v7.dat", "tracedat_small_v6.dat"):
        assert realtrace.trace_cmd_report(data / name) == want
