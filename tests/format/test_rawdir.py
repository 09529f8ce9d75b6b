"""The raw directory: name validation against hostile guests, and the real capture path.

The capture test does what the guest agent and host recorder do together, on this
machine's real tracefs: read a private instance's per_cpu trace_pipe_raw pages and the
kernel's metadata files, write a raw directory, read it back, write a trace.dat from it,
and let trace-cmd report the events.
"""
from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest

import realtrace
from vmtrace.errors import FormatError, VmtraceError
from vmtrace.format.tracedat_write import write_tracedat
from vmtrace.format.rawdir import read_rawdir, validate_name, write_metadata, write_rawdir
from vmtrace.sources import open_source, source_metadata
from vmtrace.tracefs import Tracefs

GOOD = ["header_page", "header_event", "saved_cmdlines", "printk_formats", "kallsyms",
        "kallsyms.gz", "meta.json", "events/sched/sched_switch/format",
        "events/ftrace/print/format", "events/my_sys/ev.v2-x/format"]
BAD = ["../etc/passwd", "/etc/passwd", "events/sched/../format", "events/sched/./format",
       "events/../../x/format", "events/a/b/c/format", "events/sched/sched_switch/enable",
       "header_page/../../x", "kallsyms.bz2", "meta.json\0", "", "events/s p/e/format",
       "events/sched/sched_switch/format/", "./header_page", "header_page\n"]


@pytest.mark.parametrize("name", GOOD)
def test_allowed_names(name):
    assert validate_name(name) == name


@pytest.mark.parametrize("name", BAD)
def test_refused_names(name, tmp_path):
    with pytest.raises(VmtraceError, match="refusing metadata name"):
        validate_name(name)
    with pytest.raises(VmtraceError):
        write_metadata(tmp_path, {"header_page": b"x", name: b"evil"})
    assert not (tmp_path / "metadata").exists(), "nothing is written when one name is bad"


def test_missing_or_bad_metadata_is_one_line(tmp_path):
    with pytest.raises(FormatError, match="no metadata"):
        read_rawdir(tmp_path)
    write_metadata(tmp_path, {"header_page": b"x"})
    with pytest.raises(FormatError, match="header_event is missing"):
        read_rawdir(tmp_path)
    write_metadata(tmp_path, {"header_event": b"y", "meta.json": b"{not json"})
    with pytest.raises(FormatError, match="meta.json is not valid JSON"):
        read_rawdir(tmp_path)
    write_metadata(tmp_path, {"meta.json": json.dumps({"page_size": 1000}).encode()})
    with pytest.raises(FormatError, match="bad page_size"):
        read_rawdir(tmp_path)
    write_metadata(tmp_path, {"meta.json": json.dumps({"layout": "other"}).encode()})
    with pytest.raises(FormatError, match="layout"):
        read_rawdir(tmp_path)
    write_metadata(tmp_path, {"meta.json": b"{}", "kallsyms.gz": b"\x1f\x8bnot gzip"})
    with pytest.raises(FormatError, match="kallsyms.gz"):
        read_rawdir(tmp_path)


def test_pages_stream_from_files_and_cut_pages_are_dropped(tmp_path):
    pages = [bytes([i]) * 4096 for i in range(3)]
    write_rawdir(tmp_path, {"header_page": b"hp", "header_event": b"he",
                            "meta.json": json.dumps({"cpus": [0, 2], "nr_cpus": 4,
                                                     "hostname": "g1", "clock": "global",
                                                     "stats": {"0": {"overrun": 3}}}).encode()},
                 {0: b"".join(pages) + b"partial", 2: iter(pages[:1]), 3: b""})
    with open_source(tmp_path) as src:
        assert src.kind == "rawdir" and src.nr_cpus == 4
        assert src.options["hostname"] == "g1" and src.options["clock"] == "global"
        assert src.options["cpustat"] == ["CPU: 0\noverrun: 3\n"]
        cpus = {c.cpu: c for c in src.buffers[0].cpus}
        assert sorted(cpus) == [0, 2, 3]
        assert cpus[0].size == 3 * 4096
        assert [bytes(p) for p in cpus[0].pages()] == pages
        assert [bytes(p) for p in cpus[2].pages()] == pages[:1]
        assert list(cpus[3].pages()) == []
        # chunks(): whole pages in fresh buffers the caller keeps, same bytes
        for size in (1, 4096, 2 * 4096 + 7, 1 << 20):
            got = list(cpus[0].chunks(size))
            assert all(len(c) % 4096 == 0 and len(c) <= max(4096, size) for c in got)
            assert b"".join(got) == b"".join(pages)
        assert list(cpus[3].chunks(1 << 20)) == []


def _drain(path: str, out: Path, page_size: int) -> int:
    """Read a trace_pipe_raw until it has nothing more, the way the agent's pump does."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    n = 0
    try:
        with open(out, "wb") as f:
            while True:
                try:
                    page = os.read(fd, page_size)
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        break
                    raise
                if not page:
                    break
                f.write(page.ljust(page_size, b"\0"))
                n += 1
    finally:
        os.close(fd)
    return n


@pytest.mark.tracefs
@pytest.mark.oracle
def test_real_capture_to_rawdir_to_tracedat(tmp_path):
    tf = Tracefs.create_instance(f"vmtrace-format-rawdir-{os.getpid()}")
    raw = tmp_path / "raw"
    raw.mkdir()
    try:
        tf.tracing_on = False
        tf.buffer_size_kb = 256
        tf.enable_events(["sched", "timer"])
        tf.clear()
        tf.tracing_on = True
        subprocess.run(["sh", "-c", "for i in 1 2 3 4 5; do ls / >/dev/null; sleep 0.01; done"],
                       check=False, timeout=60)
        tf.tracing_on = False
        ps = os.sysconf("SC_PAGE_SIZE")
        pages = {cpu: _drain(tf.trace_pipe_raw(cpu), raw / f"spool{cpu}", ps) for cpu in tf.cpus()}
        top = Tracefs()
        md = {"header_page": top.header_page(), "header_event": top.header_event(),
              "saved_cmdlines": top.saved_cmdlines(), "printk_formats": top.printk_formats(),
              "meta.json": json.dumps({"layout": "vmtrace-raw", "layout_version": 1,
                                       "kernel": os.uname().release, "hostname": "captured",
                                       "cpus": sorted(pages), "nr_cpus": len(pages),
                                       "page_size": ps, "long_size": 8, "endian": "little",
                                       "clock": tf.clock}).encode()}
        for system, event in tf.event_ids(["sched", "timer"]):
            md[f"events/{system}/{event}/format"] = top.event_format(system, event)
    finally:
        tf.remove()
    assert sum(pages.values()) > 0
    d = write_rawdir(tmp_path / "dir", md, {c: str(raw / f"spool{c}") for c in pages})
    with read_rawdir(d) as src:
        assert src.header_page == md["header_page"]
        assert len(src.event_formats) == sum(1 for k in md if k.startswith("events/"))
        assert {c.cpu: c.size // ps for c in src.buffers[0].cpus} == pages
        again = source_metadata(src)
    assert {k: v for k, v in again.items()} == {k: v for k, v in md.items() if k != "meta.json"}
    out = tmp_path / "captured.dat"
    write_tracedat(out, dict(again, **{"meta.json": md["meta.json"]}),
                   {c: str(raw / f"spool{c}") for c in pages})
    report = realtrace.trace_cmd_report(out)
    assert report.startswith(f"cpus={len(pages)}\n")
    assert "sched_switch:" in report or "sched_wakeup:" in report or "hrtimer_" in report
    assert "Linux captured" in realtrace.trace_cmd_report(out, "--uname")
