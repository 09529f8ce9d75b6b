"""The containment estimator (clocksync/containment.py) on a real recording and on
constructed cases.

The real case is a window of run multi-idle of the issue-15 research (tests/data/tcgsync,
meta.json says what it is): QEMU 7.2 TCG with a host thread per vCPU, guest and host both
tracing x86-tsc, a QMP stop of 2 s inside the window. Its independent reference is the
research's sandwich probe (guest rdtsc / outb to isa-debugcon / rdtsc, against the host
vCPU thread's writev), which bounds the offset of each segment to a few microseconds by a
different mechanism."""
import gzip
import json
import re

import numpy as np
import pytest

from paths import DATA as TESTDATA
from vmtrace.clocksync import containment as C
from vmtrace.clocksync import hostsched

DATA = TESTDATA / "tcgsync"
_G = re.compile(r"^\s*.*?-\d+\s+\[(\d+)\]\s+\S+\s+(\d+): (\w+):")


def _real():
    meta = json.loads((DATA / "meta.json").read_text())
    cpu2t = {int(k): v for k, v in meta["vcpu_threads"].items()}
    with gzip.open(DATA / "host-vcpus.txt.gz", "rt") as f:
        hs = hostsched.parse(f, cpu2t.values())
    g, th = [], []
    with gzip.open(DATA / "guest.txt.gz", "rt") as f:
        for line in f:
            m = _G.match(line)
            g.append(int(m.group(2)))
            th.append(cpu2t[int(m.group(1))])
    o = np.argsort(g, kind="stable")
    return meta, hs, np.array(g)[o], np.array(th)[o], cpu2t


def test_real_run_two_segments_inside_the_sandwich_bands():
    meta, hs, g, th, cpu2t = _real()
    assert hs.bad == 0 and len(hs.switches) > 3000
    on = C.oncpu_intervals(hs.switches, cpu2t.values())
    bands = meta["sandwich_bands"]
    mids = [(a + b) // 2 for a, b in bands]
    prior_w = 20_000 * meta["cycles_per_us"]        # +-20 ms, a probe fit's order of error
    est = C.estimate(g, th, on, lambda x: [(m - prior_w, m + prior_w) for m in mids])
    assert est.unexplained == 0
    assert len(est.segments) == 2                     # the QMP stop/cont, found from the data alone
    for seg, (a, b) in zip(est.segments, bands):
        assert seg.lo <= b and a <= seg.hi           # agrees with the independent sandwich probe
        assert seg.half_width < 5 * meta["cycles_per_us"]
        assert seg.outliers == 0
    # the offset jumped back by about the stop's length (2 s): the guest TSC stood still
    jump_us = (est.segments[0].offset - est.segments[1].offset) / meta["cycles_per_us"]
    assert 1.9e6 < jump_us < 2.2e6
    by = est.segments
    off = lambda x: by[0].offset if x <= by[0].last else by[1].offset
    assert C.gap_events(g, th, on, off) == []


def test_real_run_wide_prior_converges_to_the_same_band():
    meta, hs, g, th, cpu2t = _real()
    on = C.oncpu_intervals(hs.switches, cpu2t.values())
    (a, b) = meta["sandwich_bands"][0]
    wide = 100_000 * meta["cycles_per_us"]            # +-100 ms
    est = C.estimate(g, th, on, lambda x: [((a + b) // 2 - wide, (a + b) // 2 + wide)])
    first = est.segments[0]
    assert first.hi - first.lo < 10 * meta["cycles_per_us"]
    assert first.lo <= b and a <= first.hi


def _thread(gaps, tid=7):
    recs = []
    for out, back in gaps:
        recs.append(C.HostSwitch(out, tid, "out", "S"))
        recs.append(C.HostSwitch(back, tid, "in"))
    return recs


def _guest_events(gaps, offset, step=1):
    """Guest events just before each switch-out and just after each switch-in."""
    ev = []
    for out, back in gaps:
        ev += [out - step + offset, back + step + offset]
    return ev


def test_constructed_band_is_the_tightest_pair_and_contains_truth():
    gaps = [(1000 * k, 1000 * k + 500) for k in range(1, 50)]
    on = C.oncpu_intervals(_thread(gaps), [7])
    truth = 123_456
    g = _guest_events(gaps, truth, step=3)
    est = C.estimate(g, [7] * len(g), on, lambda x: [(truth - 400, truth + 400)])
    (seg,) = est.segments
    assert seg.lo <= truth <= seg.hi
    assert seg.hi - seg.lo == 6        # 3 before the switch-out, 3 after the switch-in


def _irregular(n, seed=15):
    """Gaps of irregular length at irregular times, as a real thread's are (a periodic
    pattern would make offsets a period apart indistinguishable)."""
    rng = np.random.default_rng(seed)
    t, out = 1000, []
    for _ in range(n):
        run, gap = int(rng.integers(200, 900)), int(rng.integers(100, 700))
        out.append((t + run, t + run + gap))
        t += run + gap
    return out


def test_constructed_segment_change_starts_a_new_segment():
    # the VM stops for 30 250 host units after 100 gaps: the host goes on, the guest
    # clock stands still, so the offset falls by the stop's length
    gaps = _irregular(200)
    stop = 30_250
    g1 = _guest_events(gaps[:100], 50_000, step=2)
    gaps2 = [(a + stop, b + stop) for a, b in gaps[100:]]
    g2 = _guest_events(gaps2, 50_000 - stop, step=2)
    # while stopped the vCPU thread sleeps: one long gap
    stopped = (gaps[99][1] + 150, gaps2[0][0] - 150)
    on = C.oncpu_intervals(_thread(gaps[:100] + [stopped] + gaps2), [7])
    g = g1 + g2
    assert g == sorted(g)
    priors = lambda x: [(50_000 - 300, 50_000 + 300), (50_000 - stop - 300, 50_000 - stop + 300)]
    est = C.estimate(g, [7] * len(g), on, priors)
    assert len(est.segments) == 2 and est.segments[1].first == g2[0]
    assert [s.lo <= o <= s.hi for s, o in zip(est.segments, (50_000, 50_000 - stop))] == [True, True]


def test_constructed_lone_misfit_is_an_outlier_not_a_segment():
    gaps = [(1000 * k, 1000 * k + 500) for k in range(1, 200)]
    on = C.oncpu_intervals(_thread(gaps), [7])
    g = _guest_events(gaps, 50_000, step=2)
    g.insert(101, g[100] + 250)        # a guest event in the middle of a gap: bad host record
    g.sort()
    est = C.estimate(g, [7] * len(g), on, lambda x: [(50_000 - 300, 50_000 + 300)])
    (seg,) = est.segments
    assert seg.outliers == 1 and seg.lo <= 50_000 <= seg.hi


def test_lost_switch_in_drops_the_gap():
    # out at 1000, (switch-in at 1500 not recorded), out again at 2000, in at 2500
    recs = [C.HostSwitch(1000, 7, "out", "R"), C.HostSwitch(2000, 7, "out", "S"), C.HostSwitch(2500, 7, "in")]
    on = C.oncpu_intervals(recs, [7])
    assert on[7].gaps_trusted == 1 and on[7].gaps_dropped == 1
    assert C.contained(1700, 0, on[7])         # the thread ran there: must not exclude it
    assert not C.contained(2200, 0, on[7])
    # an event the thread emitted itself inside a gap also drops it
    recs = [C.HostSwitch(1000, 7, "out", "S"), C.HostSwitch(1200, 7, "own"), C.HostSwitch(1500, 7, "in")]
    on = C.oncpu_intervals(recs, [7])
    assert on[7].gaps_trusted == 0 and C.contained(1300, 0, on[7])


def test_trailing_switch_out_is_not_a_gap():
    on = C.oncpu_intervals([C.HostSwitch(1000, 7, "out", "S")], [7])
    assert C.contained(5000, 0, on[7])


def test_parse_counts_bad_lines_and_reads_anchors():
    lines = ["# comment\n",
             " python3-5 [000] ..... 100: tracing_mark_write: vmtrace-anchor seq=4\n",
             " CPU 0/TCG-9 [001] d..2. 200: sched_switch: prev_comm=CPU 0/TCG prev_pid=9 prev_prio=120 "
             "prev_state=R+ ==> next_comm=yes next_pid=11 next_prio=120\n",
             "garbage\n", "x" * 5000 + "\n"]
    hs = hostsched.parse(lines, [9])
    assert hs.anchors == {4: 100} and hs.bad == 2
    (sw,) = hs.switches
    assert (sw.kind, sw.state, sw.other) == ("out", "R+", "yes-11")


def test_session_json_sync_fields_are_checked():
    from vmtrace.errors import VmtraceError

    assert hostsched.thread_map({"0": 12, "1": 13}, "w") == {0: 12, 1: 13}
    for bad in ({}, {"0": -1}, {"x": 3}, {"0": True}, {"0": 1 << 40}, [1], {"²": 4}):
        with pytest.raises(VmtraceError):
            hostsched.thread_map(bad, "w")
    assert hostsched.anchors_from([[1, 5, 6]], "w") == [(1, 5, 6)]
    for bad in ([[1, 6, 5]], [[1, 2]], [["1", 2, 3]], "x", [[1, -1, 2]]):
        with pytest.raises(VmtraceError):
            hostsched.anchors_from(bad, "w")


def test_steal_states_from_constructed_switches():
    from vmtrace.clocksync import steal

    H = C.HostSwitch
    recs = [H(100, 7, "in"),
            H(200, 7, "out", "R+", "yes-11"),     # preempted by yes: steal 200..260
            H(260, 7, "in"),
            H(300, 7, "out", "S", "swapper/0-0"),  # halted: sleeping 300..400
            H(400, 7, "wakeup"),                  # woken: waiting 400..410 (steal)
            H(410, 7, "in"),
            H(500, 7, "out", "R", "yes-11"),      # preempted 500..?
            H(550, 7, "own"),                     # it ran: the switch-in was lost
            H(600, 7, "out", "S", "x-1")]
    st = steal.states(recs, [7], end=700)[7]
    assert st.total("running") == 100 + 40 + 90 + 50
    assert st.total("preempted") == 60 + 50 and st.total("waking") == 10
    assert st.steal == 120 and st.total("sleeping") == 100 + 100
    assert (st.longest_steal.start, st.longest_steal.end) == (200, 260)
    assert st.top_others() == [("yes-11", 110)]
    clipped = steal.clipped({7: st}, 250, 450)[7]
    assert clipped.steal == 10 + 10 and clipped.total("running") == 40 + 40


def test_tcg_map_is_monotonic_across_a_segment_change():
    from vmtrace.clocksync.tcg import TcgMap

    segs = [C.Segment(0, 999, [(5000, 5010)]), C.Segment(1000, 2000, [(-3000, -2990)])]
    m = TcgMap(segs, None)
    g = np.arange(0, 2001, dtype=np.int64)
    h = m.to_host(g)
    assert np.all(np.diff(h) >= 0)
    assert h[0] == -5005 and h[1000] == 1000 + 2995
    assert m.shifted(7).to_host(g)[0] == -4998 and m.shifted(7).offset_for(0) == 4998
