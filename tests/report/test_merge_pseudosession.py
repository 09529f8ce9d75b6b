"""The merge and its check proved on a real two-clock session of this machine
(support/pseudosession.py builds it: a second tracefs instance on another clock stands
for the guest, with probes written as the protocol does)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pseudosession import make_pseudo_session, reader
from vmtrace import session as merge
from vmtrace.clocksync import causality

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


@pytest.fixture(scope="module")
def session_dir(tmp_path_factory) -> Path:
    return make_pseudo_session(tmp_path_factory.mktemp("pseudo") / "sess")


def test_check_passes_with_zero_violations(session_dir):
    s = merge.Session(str(session_dir), reader)
    res = causality.check_session(s)
    gc = res.guests["guest1"]
    assert gc.probes_checked == 40
    assert gc.orders_checked >= 2 + 2      # two order markers, first/last event bounds
    assert res.violations == [], [str(v) for v in res.violations]
    rep = s.reports["guest1"]
    # tai and mono tick together: the fitted drift is tiny, the error a few microseconds
    assert abs(rep.drift_ppm) < 50
    assert rep.error_ns < 50_000


def test_holdout_check_passes(session_dir):
    s = merge.Session(str(session_dir), reader)
    res = causality.check_session(s, holdout=True)
    assert res.guests["guest1"].probes_checked == 20
    assert res.violations == []


def test_wrong_offset_is_caught(session_dir):
    s = merge.Session(str(session_dir), reader)
    res = causality.check_session(s, skew_ns=200_000)   # 200 us: more than any round trip here
    assert res.guests["guest1"].probes_checked == 40
    assert len(res.violations) >= 40
    # and shifting the other way too
    res = causality.check_session(s, skew_ns=-200_000)
    assert len(res.violations) >= 40


def test_merged_is_sorted_and_keeps_every_event(session_dir):
    s = merge.Session(str(session_dir), reader)
    merged = list(s.merged())
    ts = [e.ts for e in merged]
    assert ts == sorted(ts)
    per_source = {}
    for e in merged:
        per_source[e.source] = per_source.get(e.source, 0) + 1
    for name in ("host", "guest1"):
        assert per_source[name] == sum(1 for _ in s.raw_events(name)) > 0
    # guest timestamps really were moved from tai onto mono
    g = next(e for e in merged if e.source == "guest1")
    h = next(e for e in merged if e.source == "host")
    assert g.raw_ts - g.ts > 10**17
    assert abs(g.ts - h.ts) < 10 * 10**9


def test_probe_markers_land_between_send_and_receive(session_dir):
    s = merge.Session(str(session_dir), reader)
    pairs = s.probe_markers("guest1")
    assert len(pairs) == 40
    probes = {p[3]: p for p, _ in pairs}
    for e in s.merged(["guest1"]):
        if e.event == "print" and "vmtrace-probe" in e.fields["buf"]:
            seq = int(e.fields["buf"].split("seq=")[1])
            assert probes[seq][0] <= e.ts <= probes[seq][2]


def test_jsonl_and_text_lines(session_dir):
    s = merge.Session(str(session_dir), reader)
    ev = next(iter(s.merged()))
    rec = merge.to_json(ev)
    assert set(rec) == {"ts", "source", "cpu", "pid", "comm", "event", "fields"}
    assert json.loads(json.dumps(rec)) == rec
    line = merge.format_line(ev)
    assert ev.source in line and ev.event in line


def test_boot_clock_guest(tmp_path):
    d = make_pseudo_session(tmp_path / "boot", guest_clock="boot", n_probes=12)
    s = merge.Session(str(d), reader)
    res = causality.check_session(s)
    assert res.guests["guest1"].probes_checked == 12
    assert res.violations == []


def test_bad_session_dirs_give_one_line_errors(tmp_path):
    from vmtrace.errors import VmtraceError
    with pytest.raises(VmtraceError, match="no session.json"):
        merge.Session(str(tmp_path))
    (tmp_path / "session.json").write_text("{not json")
    with pytest.raises(VmtraceError, match="unreadable"):
        merge.Session(str(tmp_path))
    (tmp_path / "session.json").write_text(json.dumps(
        {"layout": "vmtrace-session", "guests": {"../x": {"file": "x.dat"}}}))
    with pytest.raises(VmtraceError, match="bad guest name"):
        merge.Session(str(tmp_path))
    (tmp_path / "session.json").write_text(json.dumps(
        {"layout": "vmtrace-session", "guests": {"g": {"file": "../../etc/passwd"}}}))
    with pytest.raises(VmtraceError, match="inside the session"):
        merge.Session(str(tmp_path))
    (tmp_path / "session.json").write_text(json.dumps(
        {"layout": "vmtrace-session", "guests": {"g": {"file": "g.dat", "clock": "tai"}}}))
    s = merge.Session(str(tmp_path))
    with pytest.raises(VmtraceError, match="no time probes"):
        s.clock_map("g")
