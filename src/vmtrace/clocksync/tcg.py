"""TCG guests on the host's clock to the microsecond, from when their vCPU threads ran.

Under QEMU TCG (no ``-icount``) a guest's TSC is the host's TSC plus a constant that
changes only when QEMU stops the VM (docs/timeline.md has the source references and the
measurements: 0 +- 0.08 ppm of drift). A guest tracing with ``x86-tsc`` therefore needs
one offset per run segment, and :mod:`vmtrace.clocksync.containment` finds it from the
host's record of the vCPU threads (``host-vcpus.txt``, written by
:mod:`vmtrace.host.vcpusync`): every guest event must fall inside an on-CPU interval of
its vCPU's thread. The host's TSC is then put on CLOCK_MONOTONIC by the recorder's
anchors (a trace_marker stamped with the TSC between two CLOCK_MONOTONIC readings),
fitted like time probes. The bound is half the offset band plus the anchors' bound.

Anything missing (a guest not on ``x86-tsc``, no anchors, no host record, a VM this
cannot explain) falls back to the probe fit with a note saying why: the fallback's
bound is the probes' round trip, milliseconds under TCG.
"""
from __future__ import annotations

import bisect
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from vmtrace.clocksync import SyncReport
from vmtrace.clocksync import containment as C
from vmtrace.clocksync import hostsched, ptp
from vmtrace.errors import VmtraceError

PRIOR_MARGIN_NS = 2_000_000     # added around each probe's bound for the segment prior
USED_EVENTS = {"cpu_idle", "irq_handler_entry", "irq_handler_exit", "local_timer_entry", "local_timer_exit",
               "sched_switch", "sched_wakeup", "sched_waking", "print", "softirq_entry", "softirq_exit",
               "hrtimer_expire_entry", "reschedule_entry", "call_function_single_entry"}


class AnchorClock:
    """host TSC <-> CLOCK_MONOTONIC from the recorder's anchors ``(mono_before, tsc,
    mono_after)``: the TSC is first scaled to ns by the rate between the first and last
    anchor, then the small rest (NTP slew) is fitted like time probes."""

    def __init__(self, anchors: Sequence[Tuple[int, int, int]]):
        a = sorted(anchors, key=lambda x: x[1])
        if len(a) < 2:
            raise VmtraceError("fewer than 2 TSC anchors")
        self.t0 = a[0][1]
        self.m0 = (a[0][0] + a[0][2]) // 2
        span_tsc = a[-1][1] - a[0][1]
        span_ns = (a[-1][0] + a[-1][2]) / 2 - self.m0
        if span_tsc <= 0 or span_ns <= 0:
            raise VmtraceError("TSC anchors do not advance")
        self.per_ns = span_tsc / span_ns            # cycles per ns (2.6 on a 2.6 GHz host)
        self.map, self.report = ptp.fit([(lo, self.scaled(t), hi) for lo, t, hi in a])
        self.bound_ns = float(self.report.max_error_ns)

    def scaled(self, tsc: int) -> int:
        return self.m0 + int(round((tsc - self.t0) / self.per_ns))

    def to_mono(self, tsc: np.ndarray) -> np.ndarray:
        d = (np.asarray(tsc, dtype=np.int64) - self.t0).astype(np.float64) / self.per_ns
        return self.map.to_host(self.m0 + np.rint(d).astype(np.int64))

    def to_tsc(self, mono: int) -> int:
        """Approximate inverse (for priors only: microseconds off at worst)."""
        return self.t0 + int(round((mono - self.m0) * self.per_ns))


class TcgMap:
    """guest TSC -> host CLOCK_MONOTONIC: per segment ``host_tsc = guest - offset``,
    then the anchors. Segments are consecutive in guest time and each later one has a
    smaller offset (the guest clock stood still while the host's went on), so the map
    never goes backwards."""

    method = "tcg"

    def __init__(self, segments: Sequence[C.Segment], clock: Optional[AnchorClock], delta_ns: int = 0):
        if not segments:
            raise VmtraceError("TCG clock map needs at least one segment")
        self.segments = list(segments)
        self.clock = clock
        self.delta_ns = int(delta_ns)
        self._starts = [s.first for s in self.segments[1:]]
        self._offsets = np.array([s.offset for s in self.segments], dtype=np.int64)

    def offset_for(self, g: int) -> int:
        """The offset (host TSC units) this map uses at guest time ``g``, a deliberate
        shift (:meth:`shifted`) included."""
        shift = self.delta_ns * self.clock.per_ns if self.clock is not None else self.delta_ns
        return int(self._offsets[bisect.bisect_right(self._starts, g)]) - int(round(shift))

    def to_host(self, ts: np.ndarray, cpu: Optional[np.ndarray] = None) -> np.ndarray:
        ts = np.asarray(ts).astype(np.int64)
        idx = np.searchsorted(np.asarray(self._starts, dtype=np.int64), ts, side="right")
        h = ts - self._offsets[idx]
        if self.clock is not None:
            h = self.clock.to_mono(h)
        return h + self.delta_ns

    def shifted(self, delta_ns: int) -> "TcgMap":
        return TcgMap(self.segments, self.clock, self.delta_ns + int(delta_ns))


def _guest_events(session: Any, name: str, cpu2tid: Dict[int, int]) -> Tuple[np.ndarray, np.ndarray]:
    g, th = [], []
    for e in session.raw_events(name):
        if getattr(e, "kind", "event") != "event":
            continue
        n = str(getattr(e, "name", None) or getattr(e, "event", "")).rpartition(":")[2]
        tid = cpu2tid.get(int(e.cpu))
        if tid is None or n not in USED_EVENTS:
            continue
        g.append(int(e.ts))
        th.append(tid)
    o = np.argsort(np.array(g, dtype=np.int64), kind="stable")
    return np.array(g, dtype=np.int64)[o], np.array(th, dtype=np.int64)[o]


def _priors(session: Any, name: str, clock: AnchorClock):
    """Per probe (in guest time): the offset range it allows, widened. A prior for guest
    time x: the first probe after x, then the last before it."""
    rows = []
    margin = int(PRIOR_MARGIN_NS * clock.per_ns)
    for p, mts in session.probe_markers(name):
        lo = mts - clock.to_tsc(int(p[2])) - margin
        hi = mts - clock.to_tsc(int(p[0])) + margin
        rows.append((mts, lo, hi))
    rows.sort()
    keys = [r[0] for r in rows]

    def prior(x: int) -> List[Tuple[int, int]]:
        i = bisect.bisect_left(keys, x)
        out = []
        for j in (i, i - 1, i + 1):
            if 0 <= j < len(rows):
                out.append((rows[j][1], rows[j][2]))
        return out
    return prior, len(rows)


class Evidence:
    """What the method worked from, kept for ``vmtrace check`` and hold-out."""

    def __init__(self, g, th, on, clock, hs, est, probes, cpu2tid, how, prior):
        self.g, self.th, self.on, self.clock, self.hs, self.est = g, th, on, clock, hs, est
        self.probes, self.cpu2tid, self.how, self.prior = probes, cpu2tid, how, prior


def prepare(session: Any, name: str) -> Evidence:
    """Read the guest's sync section and the host record; raise VmtraceError with the
    reason when the method cannot apply (the caller falls back)."""
    src = session.source(name)
    sync = src.sync or {}
    where = "session.json: guest %s: sync" % name
    if src.clock != "x86-tsc":
        raise VmtraceError("guest traced with %r, not x86-tsc" % (src.clock or "local"))
    cpu2tid = hostsched.thread_map(sync.get("vcpu_threads"), where)
    path = session._file(sync.get("file"), name + " sync")
    if not os.path.exists(path):
        raise VmtraceError("%s: missing (named in session.json)" % path)
    hs = hostsched.read(path, cpu2tid.values())
    anchors = []
    for seq, lo, hi in hostsched.anchors_from(sync.get("anchors") or [], where):
        if seq in hs.anchors:
            anchors.append((lo, hs.anchors[seq], hi))
    clock = AnchorClock(anchors)
    on = C.oncpu_intervals(hs.switches, cpu2tid.values())
    g, th = _guest_events(session, name, cpu2tid)
    if not len(g):
        raise VmtraceError("guest trace has no events of its vCPUs")
    prior, nprobes = _priors(session, name, clock)
    if not nprobes:
        raise VmtraceError("no probe markers to start from")
    est = C.estimate(g, th, on, prior)
    if not est.segments:
        raise VmtraceError("no offset puts the guest's events inside its vCPU threads' running time")
    return Evidence(g, th, on, clock, hs, est, nprobes, cpu2tid, str(sync.get("vcpu_map_from", "")), prior)


def report_of(ev: Evidence) -> SyncReport:
    est, clock = ev.est, ev.clock
    halves = [s.half_width / clock.per_ns for s in est.segments]
    bound = max(halves) + clock.bound_ns
    used = sum(s.events for s in est.segments)
    rep = SyncReport(method="tcg", probes=ev.probes, used=used, error_ns=float(np.median(halves)) + clock.bound_ns,
                     max_error_ns=float(bound), segments=len(est.segments))
    gaps = sum(o.gaps_trusted for o in ev.on.values())
    dropped = sum(o.gaps_dropped for o in ev.on.values())
    rep.evidence = {
        "guest_events": int(est.events), "guest_events_used": int(used),
        "host_records": len(ev.hs.switches), "host_gaps": int(gaps), "host_gaps_dropped": int(dropped),
        "outliers": int(sum(s.outliers for s in est.segments)), "unexplained": int(est.unexplained),
        "anchors": clock.report.probes, "anchor_bound_ns": clock.bound_ns,
        "vcpu_threads": {str(k): v for k, v in ev.cpu2tid.items()}, "vcpu_map_from": ev.how,
        "segments": [{"first_guest_ts": s.first, "last_guest_ts": s.last, "events": s.events,
                      "band_ns": (s.hi - s.lo) / clock.per_ns, "offset_cycles": s.offset,
                      "outliers": s.outliers} for s in est.segments],
    }
    return rep


def _validate(session: Any, name: str) -> None:
    """A malformed sync section is bad input (one error line), not a reason to fall back."""
    sync = session.source(name).sync or {}
    where = "session.json: guest %s: sync" % name
    hostsched.thread_map(sync.get("vcpu_threads"), where)
    hostsched.anchors_from(sync.get("anchors") or [], where)
    session._file(sync.get("file"), name + " sync")


def build(session: Any, name: str) -> Tuple[Any, SyncReport]:
    """The method's entry in :data:`vmtrace.clocksync.METHODS`; falls back to the
    probe fit (with a note) when the containment method cannot apply (another guest
    clock, no anchors, evidence that places nothing)."""
    _validate(session, name)
    try:
        ev = prepare(session, name)
    except VmtraceError as exc:
        cmap, rep = ptp.build(session, name)
        rep.notes.append("tcg sync not used (%s): probe fit, its bound is the probes' round trip" % exc)
        return cmap, rep
    session._tcg_evidence = getattr(session, "_tcg_evidence", {})
    session._tcg_evidence[name] = ev
    return TcgMap(ev.est.segments, ev.clock), report_of(ev)


def holdout(ev: Evidence) -> Tuple["TcgMap", SyncReport, int, List[Tuple[int, int, int, int]]]:
    """Fit on every other guest event (from the probes' priors, as the full fit), then
    check the others: an event that no offset of the held-out fit's band places inside
    its thread's running time is a violation (that band, hence the bound, was wrong).
    Returns the held-out map and report, the events checked, and per violation
    ``(guest_ts, mapped_ns, running_lo_ns, running_hi_ns)`` (nearest running interval)."""
    est = C.estimate(ev.g[0::2], ev.th[0::2], ev.on, ev.prior)
    if not est.segments:
        raise VmtraceError("hold-out fit found no offset")
    half = Evidence(ev.g[0::2], ev.th[0::2], ev.on, ev.clock, ev.hs, est, ev.probes, ev.cpu2tid, ev.how, ev.prior)
    cmap = TcgMap(est.segments, ev.clock)
    starts = [s.first for s in est.segments[1:]]
    bad = []
    checked = 0
    for x, t in zip(ev.g[1::2].tolist(), ev.th[1::2].tolist()):
        seg = est.segments[bisect.bisect_right(starts, x)]
        checked += 1
        on = ev.on[t]
        if C.shrink([(seg.lo, seg.hi)], x, on):
            continue
        h = x - seg.offset
        j = bisect.bisect_left(on.ends, h)
        k = j if j < len(on.starts) and (j == 0 or on.starts[j] - h < h - on.ends[j - 1]) else j - 1
        lo, hi = max(on.starts[k], h - (1 << 40)), min(on.ends[k], h + (1 << 40))
        m = ev.clock.to_mono(np.array([h, lo, hi], dtype=np.int64)).tolist()
        bad.append((x, m[0], m[1], m[2]))
    return cmap, report_of(half), checked, bad
