"""`vmtrace report SESSION_DIR`: host and guest interleaved on the host clock (real traces
from two tracefs instances on different clocks, see support/pseudosession.py)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

import vmtrace
from pseudosession import make_pseudo_session

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]

LINE = re.compile(r"^\s*(\S+): .{16}-\S+\s+\[(\d{3})\] (\d+)\.(\d{9}): ")


def vmt(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vmtrace", *args], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    return make_pseudo_session(tmp_path_factory.mktemp("sr") / "sess", n_probes=10)


def _own_counts(session: Path) -> dict:
    meta = json.loads((session / "session.json").read_text())
    files = {"host": meta["host"]["file"], **{n: g["file"] for n, g in meta["guests"].items()}}
    out = {}
    for name, f in files.items():
        with vmtrace.open(session / f) as t:
            out[name] = t.stats()["events"]
    return out


def test_text_is_interleaved_sorted_and_complete(session: Path):
    rep = vmt("report", str(session))
    assert rep.returncode == 0, rep.stderr
    parsed = [LINE.match(l) for l in rep.stdout.splitlines()]
    assert all(parsed), [l for l, m in zip(rep.stdout.splitlines(), parsed) if not m][:3]
    ts = [int(m.group(3)) * 10**9 + int(m.group(4)) for m in parsed]
    assert ts == sorted(ts)
    per_source = {}
    for m in parsed:
        per_source[m.group(1)] = per_source.get(m.group(1), 0) + 1
    assert per_source == _own_counts(session)
    # bodies come from each source's own print fmt renderer, as trace-cmd prints them
    assert "tracing_mark_write: vmtrace-probe seq=" in rep.stdout


def test_jsonl_has_host_ns_source_and_system_names(session: Path):
    rep = vmt("report", str(session), "--format", "jsonl")
    assert rep.returncode == 0, rep.stderr
    recs = [json.loads(l) for l in rep.stdout.splitlines()]
    assert {r["source"] for r in recs} == {"host", "guest1"}
    assert all(set(r) == {"ts", "source", "cpu", "pid", "comm", "event", "fields"} for r in recs)
    assert all(":" in r["event"] for r in recs if r["event"] != "lost_events")
    assert [r["ts"] for r in recs] == sorted(r["ts"] for r in recs)


def test_html_page_is_written(session: Path, tmp_path: Path):
    page = tmp_path / "s.html"
    rep = vmt("report", str(session), "--html", str(page), "-o", str(tmp_path / "s.txt"))
    assert rep.returncode == 0, rep.stderr
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html") or "<html" in text[:200]
    assert "guest1" in text and (tmp_path / "s.txt").stat().st_size > 0


def _lines(rep: subprocess.CompletedProcess) -> list:
    assert rep.returncode == 0, rep.stderr
    parsed = [LINE.match(l) for l in rep.stdout.splitlines()]
    assert all(parsed), rep.stdout[:500]
    return parsed


def test_a_session_takes_the_options_a_trace_takes(session: Path):
    """--cpu, --events, --source, --start/--end (host clock) and --stats select from a
    session as they do from one trace: each selection is a subset of the whole, and
    exactly the lines that match it."""
    whole = _lines(vmt("report", str(session)))
    key = lambda m: (m.group(1), int(m.group(2)), int(m.group(3)) * 10**9 + int(m.group(4)))  # noqa: E731
    everything = [key(m) for m in whole]

    cpu = everything[0][1]
    one_cpu = [key(m) for m in _lines(vmt("report", str(session), "--cpu", str(cpu)))]
    assert one_cpu and one_cpu == [k for k in everything if k[1] == cpu]

    guest = [key(m) for m in _lines(vmt("report", str(session), "--source", "guest1"))]
    assert guest and guest == [k for k in everything if k[0] == "guest1"]

    ts = sorted(k[2] for k in everything)
    lo, hi = ts[len(ts) // 4], ts[3 * len(ts) // 4]
    window = [key(m) for m in _lines(vmt("report", str(session), "--start", "%d.%09d" % divmod(lo, 10**9),
                                         "--end", "%d.%09d" % divmod(hi, 10**9)))]
    assert window and window == [k for k in everything if lo <= k[2] <= hi]

    prints = _lines(vmt("report", str(session), "--events", "ftrace:print"))
    assert prints and all("tracing_mark_write" in m.string for m in prints)
    assert len(prints) == sum(1 for m in whole if "tracing_mark_write" in m.string)

    st = vmt("report", str(session), "--stats")
    assert st.returncode == 0, st.stderr
    totals = [int(line.split("│")[2]) for line in st.stdout.splitlines() if line.split("│")[1:2] == ["  all "]
              or (len(line.split("│")) > 2 and line.split("│")[1].strip() == "all")]
    counts = _own_counts(session)
    assert totals == list(counts.values()), (totals, counts)      # one table per source, in order
    assert all("%s, per CPU" % name in st.stdout for name in counts)


def test_a_session_selection_that_names_nothing_is_one_line(session: Path):
    for args, words in ((("--source", "nope"), "no source named nope"),
                        (("--events", "nosuchsystem"), "no event of any source matches")):
        rep = vmt("report", str(session), *args)
        assert rep.returncode == 2 and "Traceback" not in rep.stderr, rep.stderr
        lines = rep.stderr.strip().splitlines()
        assert len(lines) == 1 and words in lines[0], lines
