"""The timeline model: columns and per-event paths agree, labels name guests and hosts,
idle is empty, lost events stay visible, the legend ranks tasks by on-CPU time, and the
HTML page ships compact arrays (see src/vmtrace/export/timeline.py)."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import realtrace
from vmtrace import api
from vmtrace import session as merge
from vmtrace.export import chrome, html, timeline


def _same(a: timeline.Timeline, b: timeline.Timeline) -> None:
    assert a.tracks == b.tracks
    assert (a.start, a.end, a.events) == (b.start, b.end, b.events)
    for k in ("s_track", "s_start", "s_end", "i_track", "i_ts", "i_pid", "i_count"):
        assert np.array_equal(getattr(a, k), getattr(b, k)), k
    assert [a.tasks[k] for k in a.s_task.tolist()] == [b.tasks[k] for k in b.s_task.tolist()]
    assert [a.names[k] for k in a.i_name.tolist()] == [b.names[k] for k in b.i_name.tolist()]
    assert a.legend() == b.legend()


@pytest.fixture(scope="module")
def lossy_trace(tmp_path_factory) -> Path:
    """A real trace with a small buffer, so a busy CPU drops events."""
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    out = tmp_path_factory.mktemp("tl") / "trace.dat"
    return realtrace.record_tracedat(out, events=("sched", "timer", "irq", "kmem"), buffer_kb=64,
                                     instance="vmtrace-timeline-%d" % os.getpid())


@pytest.mark.tracefs
@pytest.mark.oracle
def test_columns_equal_the_per_event_path(lossy_trace):
    with api.open(lossy_trace) as tr:
        cols = timeline.from_trace(tr)
        per_event = timeline.model(tr, fields=True)
    _same(cols, per_event)
    assert len(cols.s_start) > 0 and len(cols.i_ts) > 0
    # idle is never a slice; a CPU runs one task at a time
    assert all(p not in timeline.IDLE_PIDS for p, _ in (cols.tasks[k] for k in set(cols.s_task.tolist())))
    for r in range(len(cols.tracks)):
        m = cols.s_track == r
        assert np.all(cols.s_start[m][1:] >= cols.s_end[m][:-1])
        assert np.all(cols.s_end[m] > cols.s_start[m])
    # the lost-events markers the trace has are in the model
    want = sum(1 for e in api.open(lossy_trace).events() if getattr(e, "kind", "") == "lost")
    tr_, ts_, n_ = cols.lost()
    assert len(ts_) == want


@pytest.mark.tracefs
@pytest.mark.oracle
def test_views_draw_lost_events_and_the_legend(lossy_trace, tmp_path):
    tl = html.write_timeline(str(lossy_trace), str(tmp_path / "t.png"), str(tmp_path / "t.html"))
    page = (tmp_path / "t.html").read_text()
    data = json.loads(page.split('type="application/json">', 1)[1].split("</script>", 1)[0])
    assert sum(len(L["lost"]) // 2 for L in data["lanes"]) == len(tl.lost()[1])
    assert [x[0] for x in data["legend"]] == [x[0] for x in tl.legend()]
    import matplotlib.image as mpimg
    img = mpimg.imread(str(tmp_path / "t.png"))
    if len(tl.lost()[1]):
        red = (img[..., 0] > 0.75) & (img[..., 1] < 0.15) & (img[..., 2] < 0.15)
        assert red.sum() > 10                        # the lost-events marks are drawn


def _ev(ts, cpu, name, fields=None, source="guest1", pid=1, comm="x"):
    return merge.MergedEvent(ts, source, cpu, pid, comm, name, fields or {})


def _sw(ts, cpu, prev, nxt, source="guest1"):
    return _ev(ts, cpu, "sched_switch", {"prev_pid": prev[0], "prev_comm": prev[1],
                                         "next_pid": nxt[0], "next_comm": nxt[1]}, source)


def _synthetic():
    idle0, idle1 = (0, "swapper/0"), (0, "swapper/1")
    a, b, c = (10, "busy"), (11, "less"), (12, "short")
    evs = [
        _ev(0, 0, "sched_wakeup", source="host"),
        _sw(100, 0, idle0, a), _sw(100, 1, idle1, b),
        _sw(900, 0, a, idle0),                      # busy runs 800 ns
        _sw(300, 1, b, c), _sw(320, 1, c, idle1),   # less 200, short 20
        _ev(500, 1, merge.LOST, {"count": 7}),
        _sw(1000, 0, idle0, a), _ev(1200, 0, "sched_wakeup"),
    ]
    return sorted(evs, key=lambda e: e.ts)


def test_labels_legend_and_idle_on_synthetic_events(tmp_path):
    tl = timeline.build(_synthetic())
    assert [tl.track_label(t) for t in tl.tracks] == ["host CPU 0", "guest guest1 vCPU 0",
                                                      "guest guest1 vCPU 1"]
    labels = [x[0] for x in tl.legend()]
    assert labels == ["busy-10", "less-11", "short-12"]
    assert [x[2] for x in tl.legend()] == [800 + 200, 200, 20]
    assert [x[0] for x in tl.legend(n=1)] == ["busy-10", "other (2 tasks)"]
    assert all(tl.tasks[k][0] != 0 for k in tl.s_task.tolist())       # idle: no slice
    tr, ts, n = tl.lost()
    assert ts.tolist() == [500] and n.tolist() == [7] and tl.tracks[tr[0]] == ("guest1", 1)
    # a cap on instants never drops the lost markers
    capped = timeline.build(_synthetic(), max_instants=0)
    assert capped.lost()[1].tolist() == [500] and capped.instants_total == 3
    png = timeline.write_png(tl, str(tmp_path / "s.png"))
    assert os.path.getsize(png) > 1000
    doc = chrome.chrome_trace(_synthetic())
    names = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "thread_name"}
    assert names == {"host CPU 0", "guest guest1 vCPU 0", "guest guest1 vCPU 1"}


def test_html_ships_compact_arrays_and_caps_instants(tmp_path, monkeypatch):
    evs = _synthetic()
    evs += [_ev(2000 + i, 0, "sched_stat_runtime") for i in range(50)]
    monkeypatch.setattr(html, "MAX_INSTANTS", 10)
    tl = timeline.build(evs)
    payload = html._payload(tl, html.MAX_INSTANTS)
    lanes = {L["label"]: L for L in payload["lanes"]}
    g0 = lanes["guest guest1 vCPU 0"]
    # slices as [gap since previous end, duration, task]: busy 100..900 and 1000..2049
    busy = payload["tasks"].index(["busy", 10])
    assert g0["s"][:3] == [100, 800, busy] and g0["s"][3:5] == [100, 2049 - 1000]
    assert sum(len(L["i"]) // 3 for L in payload["lanes"]) <= 10 + 1
    assert lanes["guest guest1 vCPU 1"]["lost"] == [500, 7]
    assert payload["instants"] == 53 and payload["legend"][0][0] == "busy-10"


def test_trace_identity_from_session_json_and_hostname(tmp_path):
    class Src:
        def __init__(self, path, options):
            self.path, self.options = path, options

    class T:
        def __init__(self, path, options):
            self.source, self.name = Src(path, options), path

    (tmp_path / "session.json").write_text(json.dumps({"guests": {"vm7": {"file": "vm7.dat"}},
                                                       "host": {"file": "host.dat"}}))
    assert api.trace_identity(T(str(tmp_path / "vm7.dat"), {})) == ("guest", "vm7")
    assert api.trace_identity(T(str(tmp_path / "host.dat"), {})) == ("host", "host")
    other = tmp_path / "x" / "t.dat"
    assert api.trace_identity(T(str(other), {"hostname": "demo", "version": "vmtrace 0.1.0 (agent 0.1.0)"})) \
        == ("guest", "demo")
    assert api.trace_identity(T(str(other), {"hostname": "box"})) == ("trace", "box")
    assert api.trace_identity(T(str(other), {})) == ("trace", "trace")


def test_small_trace_files_draw(data_dir, tmp_path):
    for name in ("tracedat_small_v7.dat", "tracedat_small_v6.dat"):
        with api.open(data_dir / name) as tr:
            a = timeline.from_trace(tr)
            b = timeline.model(tr, fields=True)
        _same(a, b)
        if a.tracks:
            html.write_timeline(str(data_dir / name), str(tmp_path / (name + ".png")),
                                    str(tmp_path / (name + ".html")))
