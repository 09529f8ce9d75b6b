"""Viewers: the Chrome/Perfetto JSON, the PNG timeline and the HTML page (in headless
Chromium), all from a real two-clock session (see support/pseudosession.py)."""
from __future__ import annotations

import json
import shutil
import subprocess
from collections import Counter

import pytest

import pseudosession as ps
from images import not_blank
from vmtrace import session as merge
from vmtrace.export import chrome, html, timeline

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


@pytest.fixture(scope="module")
def events(tmp_path_factory):
    d = ps.make_pseudo_session(tmp_path_factory.mktemp("views") / "sess", n_probes=20)
    return list(merge.Session(str(d), ps.reader).merged())


def test_timeline_model_matches_the_events(events):
    tl = timeline.build(events)
    cpus = {(e.source, e.cpu) for e in events}
    assert set(tl.tracks) == cpus
    assert tl.tracks[0][0] == "host"
    switches = Counter((e.source, e.cpu) for e in events if e.event == "sched_switch")
    assert sum(switches.values()) > 0
    per_track = Counter(s.track for s in tl.slices)
    for t, n in per_track.items():
        assert n <= switches[t] + 1
    for t in tl.tracks:
        ss = sorted((s for s in tl.slices if s.track == t), key=lambda s: s.start)
        assert all(a.end <= b.start for a, b in zip(ss, ss[1:]))      # a CPU runs one task at a time
        assert all(s.pid != 0 for s in ss)
    assert len(tl.instants) == sum(1 for e in events if e.event != "sched_switch")


def test_chrome_json_reads_back(events, tmp_path):
    path = chrome.write_chrome_json(events, str(tmp_path / "trace.json"))
    doc = json.load(open(path))
    evs = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in evs if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(procs.values()) == ["guest1", "host"]
    threads = {(procs[e["pid"]], e["args"]["name"]) for e in evs if e["ph"] == "M" and e["name"] == "thread_name"}
    want = {(s, "host CPU %d" % c if s == "host" else "guest %s vCPU %d" % (s, c))
            for s, c in {(e.source, e.cpu) for e in events}}
    assert threads == want
    xs = [e for e in evs if e["ph"] == "X"]
    inst = [e for e in evs if e["ph"] == "i"]
    assert xs and all(e["dur"] >= 0 for e in xs)
    assert len(inst) == sum(1 for e in events if e.event != "sched_switch")
    # guest and host slices share one time axis (host clock, microseconds)
    span = {s: (min(e["ts"] for e in xs if procs[e["pid"]] == s), max(e["ts"] for e in xs if procs[e["pid"]] == s))
            for s in procs.values()}
    assert abs(span["guest1"][0] - span["host"][0]) < 1e6
    probe = next(e for e in inst if e["name"] == "print" and "vmtrace-probe" in e["args"]["buf"])
    assert probe["s"] == "t" and isinstance(probe["args"]["pid"], int)
    assert chrome.chrome_trace(events)["traceEvents"][0]["ph"] == "M"


def test_png_timeline(events, tmp_path):
    tl = html.write_timeline(events, str(tmp_path / "t.png"), str(tmp_path / "t.html"))
    assert len(tl.tracks) >= 2
    not_blank(str(tmp_path / "t.png"))
    assert (tmp_path / "t.html").read_text().count("<script") == 2


@pytest.mark.skipif(shutil.which("chromium") is None, reason="needs Debian chromium (make test installs it)")
def test_html_page_draws_in_headless_chromium(events, tmp_path):
    page = html.write_html(events, str(tmp_path / "timeline.html"), title="pseudo session </script>")
    text = open(page).read()
    assert "http://" not in text.replace("http://www.w3.org", "") and "https://" not in text   # self-contained
    base = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1200,400",
            "--user-data-dir=%s" % (tmp_path / "profile")]
    dom = subprocess.run(base + ["--dump-dom", "file://" + page], capture_output=True, text=True, timeout=120).stdout
    tl = timeline.build(events)
    assert 'data-drawn="yes"' in dom
    assert 'data-tracks="%d"' % len(tl.tracks) in dom
    drawn = int(dom.split('data-slices="')[1].split('"')[0])
    assert drawn == len(tl.slices) > 0
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--screenshot=%s" % shot, "file://" + page], capture_output=True, timeout=120)
    assert shot.exists() and shot.stat().st_size > 5000
    not_blank(str(shot))


def test_sched_switch_without_fields_is_one_line_error():
    from vmtrace.errors import VmtraceError
    bad = [merge.MergedEvent(1, "host", 0, 1, "x", "sched_switch", {})]
    with pytest.raises(VmtraceError, match="sched_switch at 1"):
        timeline.build(bad)
    with pytest.raises(VmtraceError, match="no events"):
        timeline.write_png(timeline.build([]), "/tmp/never.png")
