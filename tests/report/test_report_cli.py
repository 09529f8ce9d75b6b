"""`vmtrace report` as a user runs it: options, exports, errors as one line with exit 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import realtrace

VMTRACE = [sys.executable, "-m", "vmtrace"]


def run(*args, check_rc=0):
    p = subprocess.run(VMTRACE + ["report", *map(str, args)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=120)
    assert p.returncode == check_rc, (p.returncode, p.stderr[-2000:])
    return p


def test_not_a_trace_is_one_line_exit_2(tmp_path):
    bad = tmp_path / "bad.dat"
    bad.write_bytes(b"\x17\x08Dtracing" + b"\xff" * 40)   # right magic, garbage after
    p = run(bad, check_rc=2)
    assert p.stderr.startswith("vmtrace: error: ") and p.stderr.count("\n") == 1
    assert "Traceback" not in p.stderr
    p = run(tmp_path / "missing.dat", check_rc=2)
    assert "missing.dat" in p.stderr and p.stderr.count("\n") == 1
    junk = tmp_path / "junk"
    junk.write_bytes(b"hello world")
    p = run(junk, check_rc=2)
    assert "junk: offset 0" in p.stderr


@pytest.mark.tracefs
@pytest.mark.oracle
def test_options_against_trace_cmd(real_trace, tmp_path):
    # text default == trace-cmd report
    p = run(real_trace)
    theirs = realtrace.trace_cmd_report(real_trace).splitlines()
    ours = p.stdout.splitlines()
    same = sum(a == b for a, b in zip(theirs, ours))
    assert same / max(len(theirs), len(ours)) >= 0.999

    # --events / --cpu filter like trace-cmd's -F / --cpu
    p = run(real_trace, "--events", "sched:sched_switch", "--cpu", "0")
    lines = [l for l in p.stdout.splitlines()[1:] if "EVENTS DROPPED" not in l]
    assert lines and all("sched_switch:" in l and "[000]" in l for l in lines)
    # (trace-cmd 3.1.6's own --cpu prints nothing for instance buffers: filter its text)
    theirs = [l for l in realtrace.trace_cmd_report(real_trace).splitlines()
              if "sched_switch:" in l and "[000]" in l]
    # from the CPU column on (the comm column depends on which events taught names)
    assert [l[l.index("[000]"):] for l in lines] == [l[l.index("[000]"):] for l in theirs]

    # --start/--end in the seconds shown
    times = [float(l.split("]")[1].split(":")[0]) for l in ours[1:] if "]" in l and "DROPPED" not in l]
    mid = sorted(times)[len(times) // 2]
    p = run(real_trace, "--start", f"{mid:.6f}")
    shown = [float(l.split("]")[1].split(":")[0]) for l in p.stdout.splitlines()[1:]
             if "]" in l and "DROPPED" not in l]
    assert shown and min(shown) >= mid - 1e-6 and len(shown) < len(times)

    # jsonl and parquet exports, same events
    out = tmp_path / "x.jsonl"
    run(real_trace, "--format", "jsonl", "-o", out)
    recs = [json.loads(l) for l in out.read_text().splitlines()]
    assert sum("event" in r for r in recs) == len(times)
    pq = tmp_path / "x.parquet"
    run(real_trace, "--format", "parquet", "-o", pq)
    import pyarrow.parquet as papq
    assert papq.read_table(pq).num_rows == len(times)

    # --stats: a table with per-CPU and per-event counts
    p = run(real_trace, "--stats")
    assert "per CPU" in p.stdout and "sched:sched_switch" in p.stdout

    # bad option values: one line, exit 2
    p = run(real_trace, "--cpu", "x-y", check_rc=2)
    assert p.stderr.startswith("vmtrace: error: --cpu")
    p = run(real_trace, "--events", "nosuch:event", check_rc=2)
    assert "no event matches" in p.stderr


@pytest.mark.tracefs
@pytest.mark.oracle
def test_keep_going_on_a_corrupted_page(real_trace, tmp_path):
    """A page with a broken commit field: default is an error naming the offset;
    --keep-going prints the rest and says how much it skipped."""
    v6 = realtrace.convert_v6(real_trace, tmp_path / "v6.dat")
    out = subprocess.run(["trace-cmd", "dump", "--flyrecord", "-i", str(v6)],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True).stdout
    import re
    data = [(int(o), int(s)) for o, s in re.findall(r"^\s+(\d+)\s+(\d+)\s+\[offset, size of cpu", out, re.M)
            if int(s)]
    if not data:
        pytest.skip("trace-cmd dump did not list CPU data offsets")
    off = data[0][0]
    raw = bytearray(v6.read_bytes())
    raw[off + 8:off + 16] = (0xFFFF).to_bytes(8, "little")   # commit larger than the page
    bad = tmp_path / "bad.dat"
    bad.write_bytes(bytes(raw))
    p = run(bad, check_rc=2)
    assert "offset" in p.stderr and p.stderr.count("\n") == 1
    p = run(bad, "--keep-going")
    assert p.stdout.startswith("cpus=") and len(p.stdout.splitlines()) > 10
    assert "skipped" in p.stderr


@pytest.mark.tracefs
@pytest.mark.oracle
def test_formats_dir_for_a_seed_style_raw_directory(real_trace, tmp_path):
    """A seed agent leaves only cpuN page files; --formats supplies the guest's tracefs copy.

    Here the pages come from a real trace.dat of this machine and the formats from this
    machine's tracefs, so the events must print as trace-cmd prints the trace.dat."""
    from vmtrace.sources import open_source
    seed = tmp_path / "seed"
    seed.mkdir()
    with open_source(real_trace) as src:
        buf = next(b for b in src.buffers if any(c.size for c in b.cpus))
        for c in buf.cpus:
            with open(seed / f"cpu{c.cpu}", "wb") as f:
                for page in c.pages():
                    f.write(page)
    # the guest-side copy: header files, the formats of the recorded systems, the
    # name tables, and /proc/kallsyms (tracefs has no symbols; %pS needs them)
    import shutil
    fdir = tmp_path / "guest-tracefs"
    for system in ("sched", "timer", "irq"):
        shutil.copytree(f"/sys/kernel/tracing/events/{system}", fdir / "events" / system,
                        ignore=lambda d, names: [n for n in names if n not in ("format",) and
                                                 not (Path(d) / n).is_dir()])
    for name in ("header_page", "header_event"):
        shutil.copyfile(f"/sys/kernel/tracing/events/{name}", fdir / name)
    for name in ("saved_cmdlines", "printk_formats"):
        shutil.copyfile(f"/sys/kernel/tracing/{name}", fdir / name)
    shutil.copyfile("/proc/kallsyms", fdir / "kallsyms")
    p = run(seed, "--formats", fdir)
    ours = [l.split("]", 1)[1] for l in p.stdout.splitlines() if "]" in l and "DROPPED" not in l]
    theirs = [l.split("]", 1)[1] for l in realtrace.trace_cmd_report(real_trace).splitlines()
              if "]" in l and "DROPPED" not in l]
    assert len(ours) == len(theirs) > 100
    same = sum(a == b for a, b in zip(ours, theirs))
    assert same / len(theirs) >= 0.999
    # without --formats a bare page directory is a clear one-line error
    p = run(seed, check_rc=2)
    assert p.stderr.startswith("vmtrace: error: ") and "metadata" in p.stderr


def test_html_beside_the_text_report_of_one_trace(real_trace, tmp_path):
    """`--html` on a single trace: the page is written from the same opened trace, and
    the text report that follows is still whole."""
    page = tmp_path / "t.html"
    p = run(real_trace, "--html", page)
    assert p.stdout == run(real_trace).stdout
    html = page.read_text()
    assert html.lstrip().lower().startswith("<!doctype html") and "<canvas" in html.lower()
    assert "sched_switch" in html
