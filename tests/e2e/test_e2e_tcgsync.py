"""The microsecond clock sync and the steal record of a real TCG guest (issue 15).

The lab guest boots with one host thread per vCPU (``thread=multi``), QMP and named
threads (the demo's wiring); the recording has host events, so the recorder maps each
vCPU to its host thread, asks the guest for ``x86-tsc`` and records the threads'
scheduling on the host (host/vcpusync.py). A busy loop is pinned, together with vCPU
1's thread (which runs the guest's intloop, always runnable), to host CPU 0: that
thread must then wait for the CPU, for sure.

Asserted, because the method guarantees it: the tcg method is used; ``vmtrace check``
finds 0 violations, including the hold-out (every other guest event refitted, the
others checked against their thread's running time); no guest event is mapped into
an off-CPU gap of its thread; and the steal the session shows for vCPU 1 matches the
host's own sched_switch accounting of that thread in host.dat (a separate tracefs
instance on another clock, decoded by the trace.dat reader). The bound itself depends
on the machine's load and is printed, not asserted (docs/timeline.md has the figures).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from labguest import lab_image
from vmtrace import cli
from vmtrace import session as merge

pytestmark = [pytest.mark.vm, pytest.mark.tracefs, pytest.mark.slow, pytest.mark.timeout(400)]

GUEST = "demo"


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from vmtrace.host import vcpusync
    from vmtrace.host.recording import record
    from vmtrace.lab.demo import AgentGuest, guest_script, workload_command

    if (os.cpu_count() or 1) < 2:
        pytest.skip("needs 2 host CPUs (one shared by the busy loop and a vCPU thread)")
    tmp = tmp_path_factory.mktemp("e2e-tcgsync")
    old = os.environ.get("VMTRACE_TCG_THREAD")
    os.environ["VMTRACE_TCG_THREAD"] = "multi"
    busy = None
    try:
        script = guest_script(workload_command(3, 2))
        with AgentGuest(lab_image(), script, tmp / "vm", smp=2, accel="tcg", name=GUEST) as ag:
            threads = vcpusync.qmp_cpus(str(ag.qmp))
            assert len(set(threads.values())) == 2, threads
            busy = subprocess.Popen([sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"])
            os.sched_setaffinity(threads[1], {0})
            out = tmp / "session"
            doc = record([ag.layout.path], outdir=str(out), duration=4.5, events=["sched", "irq"],
                         host_events=["sched:sched_switch", "sched:sched_wakeup"], hello_timeout=10.0)
            ag.guest.wait_exit(90)
    finally:
        if busy is not None:
            busy.send_signal(signal.SIGKILL)
            busy.wait()
        if old is None:
            os.environ.pop("VMTRACE_TCG_THREAD", None)
        else:
            os.environ["VMTRACE_TCG_THREAD"] = old
    g = doc["guests"][GUEST]
    assert doc["errors"] == [] and g["problems"] == [], doc
    assert g["clock"] == "x86-tsc" and g["sync"]["method"] == "tcg", g.get("sync")
    assert g["sync"]["vcpu_map_from"] == "qmp query-cpus-fast"
    return out, threads


def _figure(out: Path, key: str, value: dict) -> None:
    """Figures for docs/timeline.md, in figures.json beside the session (output is
    captured by the tests that use capsys)."""
    path = out.parent / "figures.json"
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc[key] = value
    path.write_text(json.dumps(doc, indent=1))


def _check(session: Path, capsys, *extra: str) -> tuple:
    try:
        code = cli.main(["check", str(session), "--json", *extra])
    except SystemExit as exc:
        code = exc.code
    return code, json.loads(capsys.readouterr().out)


def test_check_tcg_zero_violations_with_holdout(recorded, capsys):
    out, _ = recorded
    code, res = _check(out, capsys)
    g = res["guests"][GUEST]
    _figure(out, "sync", {k: g[k] for k in ("method", "error_ns", "max_error_ns", "segments", "evidence")})
    assert (code, res["violations"]) == (0, 0), res
    assert g["method"] == "tcg" and g["segments"] == 1 and g["max_error_ns"] > 0
    assert g["holdout"]["events_checked"] > 1000 and g["holdout"]["violations"] == []
    # the text form names the evidence
    assert cli.main(["check", str(out)]) == 0
    text = capsys.readouterr().out
    assert "method tcg" in text and "trusted off-CPU gaps" in text and "segment 1:" in text


def test_no_guest_event_in_an_off_cpu_gap(recorded):
    from vmtrace.clocksync import containment

    out, _ = recorded
    s = merge.Session(str(out))
    cmap = s.clock_map(GUEST)
    ev = s._tcg_evidence[GUEST]
    assert containment.gap_events(ev.g, ev.th, ev.on, cmap.offset_for) == []
    assert ev.est.unexplained == 0


def _host_dat_steal(out: Path, tid: int, lo: int, hi: int) -> int:
    """Thread ``tid``'s switches and wake-ups from host.dat (clock mono), and the time
    from which host.dat lost events (None: none lost)."""
    from vmtrace.api import open as api_open
    from vmtrace.clocksync.containment import HostSwitch
    from vmtrace.clocksync import steal

    recs = []
    lost = None
    last = {}
    with api_open(str(out / "host.dat")) as t:
        for e in t.events(events=["sched:sched_switch", "sched:sched_wakeup"]):
            if getattr(e, "kind", "event") == "lost":
                # the missing events lie between this CPU's previous event and the mark
                at = last.get(int(e.cpu), 0)
                lost = at if lost is None else min(lost, at)
                continue
            last[int(e.cpu)] = int(e.ts)
            f = e.fields
            if e.name == "sched_switch":
                if int(f["prev_pid"]) == tid:
                    st = f["prev_state"]
                    st = st if isinstance(st, str) else ("R" if int(st) & 0xff == 0 else "S")   # 0x100: preempted
                    recs.append(HostSwitch(int(e.ts), tid, "out", st, ""))
                if int(f["next_pid"]) == tid:
                    recs.append(HostSwitch(int(e.ts), tid, "in"))
            elif int(f["pid"]) == tid:
                recs.append(HostSwitch(int(e.ts), tid, "wakeup"))
    return recs, lost


def test_steal_matches_the_hosts_own_accounting(recorded, capsys):
    from vmtrace.clocksync import steal

    out, threads = recorded
    s = merge.Session(str(out))
    lo, hi = s.meta["started_ns"], s.meta["stopped_ns"]
    tid = threads[1]
    recs, lost = _host_dat_steal(out, tid, lo, hi)
    assert recs, "host.dat has no switch of vCPU 1's thread"
    # host.dat starts and ends at its own agent's start and stop: compare where both
    # know the thread's state; if host.dat's buffer overflowed (it records every
    # task's switches), only up to there
    lo, hi = max(lo, recs[0].ts), min(hi, recs[-1].ts)
    if lost is not None:
        hi = min(hi, lost)
    if hi - lo < 500_000_000:
        pytest.skip("host.dat covers only %.3f s of the recording (lost events)" % ((hi - lo) / 1e9))
    ours_st = steal.session_states(s, GUEST, lo, hi)[1][tid]
    ours = ours_st.steal
    theirs = steal.clipped(steal.states(recs, [tid]), lo, hi)[tid].steal
    _figure(out, "steal_vcpu1", {"session_ms": ours / 1e6, "host_dat_ms": theirs / 1e6, "window_s": (hi - lo) / 1e9})
    assert theirs > 0 and ours > 0          # the pinned busy loop made it wait
    # the same kernel events, in two instances on two clocks: equal up to the TSC
    # anchors' error at both edges of each span (a few us; measured: 0.05 ms in 2.8 s)
    spans = sum(1 for sp in ours_st.spans if sp.state in steal.STEAL_STATES)
    assert abs(ours - theirs) <= 2 * spans * 5_000 + 1_000_000, (ours, theirs, spans)
    assert cli.main(["report", str(out), "--steal"]) == 0
    table = capsys.readouterr().out
    assert "%d" % tid in table and "steal" in table


def test_timeline_has_a_host_thread_track_per_vcpu_with_steal(recorded):
    from vmtrace.export.timeline import STEAL_COMM, model
    from vmtrace.session import SessionSource

    out, _ = recorded
    with SessionSource(str(out)) as src:
        tl = model(src)
    tracks = [t for t in tl.tracks if tl.kind(t[0]) == "vcpu-thread"]
    assert tracks == [(GUEST + "/vcpu-threads", 0), (GUEST + "/vcpu-threads", 1)]
    k = tl.tracks.index((GUEST + "/vcpu-threads", 1))
    steal_ix = [i for i, t in enumerate(tl.tasks) if t[1] == STEAL_COMM]
    assert ((tl.s_track == k) & np.isin(tl.s_task, steal_ix)).any()
    assert tl.track_label(tracks[1]) == "%s vCPU 1: host thread" % GUEST


def test_perfetto_export_has_the_vcpu_thread_tracks(recorded, tmp_path):
    pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")
    out, threads = recorded
    path = tmp_path / "s.pftrace"
    assert cli.main(["report", str(out), "--format", "perfetto", "-o", str(path)]) == 0
    t = pb.Trace()
    t.ParseFromString(path.read_bytes())
    desc = {p.track_descriptor.uuid: p.track_descriptor.name for p in t.packet if p.HasField("track_descriptor")}
    assert sorted(desc.values()) == ["%s vCPU %d: host thread %d" % (GUEST, c, threads[c]) for c in (0, 1)]
    vcpu1 = next(u for u, n in desc.items() if n.startswith("%s vCPU 1:" % GUEST))
    begins = [p.track_event.name for p in t.packet if p.HasField("track_event")
              and p.track_event.track_uuid == vcpu1 and p.track_event.type == 1]
    assert any(n.startswith("steal (ran: ") for n in begins) and "vCPU running" in begins
