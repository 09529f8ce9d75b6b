"""Probes and orders are paired with their guest markers by seq, not by position.

Synthetic sessions (no tracefs needed): a guest whose clock is the host's plus a fixed
offset, probes every 0.5 s with a 20 us round trip, and the agent's markers in the
middle of each round trip. Then markers or replies go missing, as they do when a
ring buffer overflows or a reply is lost, and the pairing must not shift.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import pytest

from vmtrace import session as merge
from vmtrace.clocksync import causality

OFFSET = 5_000_000_000_000
RTT = 20_000


class Ev(NamedTuple):
    ts: int
    cpu: int
    pid: int
    comm: str
    system: str
    name: str
    fields: dict


def _session(tmp_path: Path, *, drop_marker=(), drop_reply=(), with_seq=True, n=12,
             orders_seq=True, stop_ack=True) -> merge.Session:
    probes, guest_events = [], []
    t = 1_000_000_000
    start_send = t - 400_000
    guest_events.append(Ev(start_send + 5_000 + OFFSET, 0, 10, "agent", "ftrace", "print",
                           {"buf": "vmtrace-order kind=start" + (" seq=1" if orders_seq else "")}))
    for seq in range(1, n + 1):
        s = t + seq * 500_000_000
        g = s + RTT // 2 + OFFSET
        if seq not in drop_marker:
            guest_events.append(Ev(g, seq % 2, 10, "agent", "ftrace", "print",
                                   {"buf": "vmtrace-probe seq=%d" % seq}))
        guest_events.append(Ev(g + 1_000_000, 0, 11, "work", "sched", "sched_switch", {"prev_pid": "11"}))
        if seq not in drop_reply:
            probes.append([s, g - 3_000, s + RTT] + ([seq] if with_seq else []))
    stop_send = t + (n + 1) * 500_000_000
    guest_events.append(Ev(stop_send + 5_000 + OFFSET, 1, 10, "agent", "ftrace", "print",
                           {"buf": "vmtrace-order kind=stop" + (" seq=2" if orders_seq else "")}))
    orders = [["start", start_send, start_send + RTT] + ([1] if orders_seq else []),
              ["stop", stop_send, (stop_send + RTT) if stop_ack else None] + ([2] if orders_seq else [])]
    host_events = [Ev(t + i * 100_000_000, 0, 1, "hostwork", "sched", "sched_switch", {}) for i in range(70)]
    doc = {"layout": "vmtrace-session", "version": 1,
           "host": {"file": "host.dat", "clock": "mono"},
           "guests": {"g1": {"file": "g1.dat", "clock": "mono", "cpus": 2,
                             "probes": probes, "orders": orders}}}
    (tmp_path / "session.json").write_text(json.dumps(doc))
    (tmp_path / "host.dat").write_bytes(b"")
    (tmp_path / "g1.dat").write_bytes(b"")
    data = {"host.dat": host_events, "g1.dat": sorted(guest_events)}
    return merge.Session(str(tmp_path), reader=lambda p: iter(data[Path(p).name]))


def test_missing_marker_does_not_shift_the_pairing(tmp_path):
    s = _session(tmp_path, drop_marker={4})
    pairs = s.probe_markers("g1")
    assert [p[3] for p, _ in pairs] == [q for q in range(1, 13) if q != 4]
    for p, mts in pairs:
        assert mts - OFFSET - p[0] == RTT // 2
    res = causality.check_session(s)
    assert res.violations == []
    assert res.guests["g1"].probes_checked == 11


def test_missing_reply_does_not_shift_the_pairing(tmp_path):
    s = _session(tmp_path, drop_reply={3, 7})
    assert causality.check_session(s).violations == []
    assert causality.check_guest(s, "g1", holdout=True).violations == []


def test_three_element_probes_still_accepted(tmp_path):
    s = _session(tmp_path, with_seq=False)
    assert len(s.probe_markers("g1")) == 12
    assert causality.check_session(s).violations == []


def test_three_element_probes_shift_when_a_reply_is_lost(tmp_path):
    """Why the seq is stored: without it a lost reply pairs later probes with the
    wrong markers, and the check (rightly) fails."""
    s = _session(tmp_path, with_seq=False, drop_reply={5})
    assert causality.check_session(s).violations


def test_orders_are_checked_like_probes_by_seq(tmp_path):
    s = _session(tmp_path)
    gc = causality.check_session(s).guests["g1"]
    assert gc.violations == []
    # two order markers + first-event and last-event bounds
    assert gc.orders_checked == 4
    bad = causality.check_session(s, skew_ns=200_000).guests["g1"]
    assert any(v.what.startswith("order start seq=1") for v in bad.violations)
    assert any(v.what.startswith("order stop seq=2") for v in bad.violations)


def test_order_markers_without_seq_and_unacknowledged_stop(tmp_path):
    s = _session(tmp_path, orders_seq=False, stop_ack=False)
    gc = causality.check_session(s).guests["g1"]
    assert gc.violations == []
    assert gc.orders_checked == 3   # both markers, first-event bound; no stop ack to bound by


@pytest.mark.parametrize("order", [["start"], ["start", "x", 1], "start"])
def test_bad_order_entry_is_one_line_error(tmp_path, order):
    s = _session(tmp_path)
    s.sources["g1"].orders = [order]
    with pytest.raises(merge.VmtraceError):
        causality.check_session(s)
