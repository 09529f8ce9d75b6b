"""Prove a merged timeline right by causality.

A guest wrote its ``vmtrace-probe seq=N`` trace_marker line after the host sent probe N
and before the host received the answer. On a correct merged timeline the marker's
mapped timestamp therefore lies in ``[host_send, host_recv]``; anywhere else is a
violation, and a map that is off by more than a round trip cannot hide. The same goes
for start/stop orders: no guest event can precede the host sending the first start
(tracing was off), nor follow the acknowledgment of the last stop; an order that has its
own ``vmtrace-order kind=K`` marker is checked like a probe.

The probes that also served to fit the map are checked with the marker's timestamp,
which is the kernel's trace clock rather than the agent's user-space reading; with
``holdout=True`` the map is refitted on every other probe and only the others are
checked, which makes the proof independent of the fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional

import numpy as np

from vmtrace.clocksync import ClockMap, SyncReport, marker_seq
from vmtrace.errors import VmtraceError


@dataclass
class Violation:
    source: str
    what: str            # "probe seq=N", "order start", "first event", ...
    mapped_ns: int
    lo_ns: int
    hi_ns: int

    def __str__(self) -> str:
        miss = self.lo_ns - self.mapped_ns if self.mapped_ns < self.lo_ns else self.mapped_ns - self.hi_ns
        return "%s: %s at %d, outside [%d, %d] by %d ns" % (
            self.source, self.what, self.mapped_ns, self.lo_ns, self.hi_ns, miss)


@dataclass
class GuestCheck:
    source: str
    probes_checked: int = 0
    orders_checked: int = 0
    violations: List[Violation] = field(default_factory=list)
    report: Optional[SyncReport] = None
    margin_ns: Optional[int] = None   # smallest distance of a mapped marker to its bounds
    events_checked: int = 0           # guest events checked against their vCPU thread (tcg)
    notes: List[str] = field(default_factory=list)


@dataclass
class CheckResult:
    guests: Dict[str, GuestCheck] = field(default_factory=dict)

    @property
    def violations(self) -> List[Violation]:
        return [v for g in self.guests.values() for v in g.violations]

    @property
    def checked(self) -> int:
        return sum(g.probes_checked + g.orders_checked for g in self.guests.values())


def _within(source: str, what: str, mapped: int, lo: int, hi: int, gc: GuestCheck) -> None:
    if mapped < lo or mapped > hi:
        gc.violations.append(Violation(source, what, mapped, lo, hi))
    else:
        m = min(mapped - lo, hi - mapped)
        gc.margin_ns = m if gc.margin_ns is None else min(gc.margin_ns, m)


def check_guest(session, name: str, cmap: Optional[ClockMap] = None, *, skew_ns: int = 0,
                holdout: bool = False) -> GuestCheck:
    """Check one guest of a :class:`vmtrace.session.Session`."""
    gc = GuestCheck(name)
    pairs = session.probe_markers(name)
    ev = _tcg_evidence(session, name) if holdout else None
    if ev is not None:
        # tcg: refit on every other guest event; check the others against their vCPU
        # thread's running time, and every probe and order against the refitted map
        from vmtrace.clocksync import tcg
        cmap, gc.report, gc.events_checked, bad = tcg.holdout(ev)
        for x, mapped, lo, hi in bad:
            gc.violations.append(Violation(name, "guest event (raw ts %d) in its vCPU thread's off-CPU gap" % x,
                                           mapped, lo, hi))
    elif holdout:
        from vmtrace.clocksync import ptp
        fit_on = [(p[0], mts, p[2]) for i, (p, mts) in enumerate(pairs) if i % 2 == 0]
        if len(fit_on) < 2:
            raise VmtraceError("guest %s: too few probe markers for a hold-out check" % name)
        cmap, gc.report = ptp.fit(fit_on)
        pairs = [pm for i, pm in enumerate(pairs) if i % 2 == 1]
    else:
        cmap = cmap or session.clock_map(name)
        gc.report = session.reports.get(name)
    if skew_ns:
        cmap = cmap.shifted(skew_ns)
    if not pairs and session.source(name).probes:
        gc.notes.append("no probe markers found in the guest trace; probes not checked")
    if pairs:
        raw = np.array([mts for _p, mts in pairs], dtype=np.int64)
        cpus = np.array([_marker_cpu(session, name, mts) for _p, mts in pairs], dtype=np.int64)
        mapped = cmap.to_host(raw, cpus)
        for (p, _), h in zip(pairs, mapped.tolist()):
            seq = p[3] if len(p) > 3 else None
            _within(name, "probe" + ("" if seq is None else " seq=%s" % seq), h, int(p[0]), int(p[2]), gc)
            gc.probes_checked += 1
    _check_orders(session, name, cmap, gc)
    if ev is None and getattr(cmap, "method", "") == "tcg":
        ev = _tcg_evidence(session, name)
        if ev is not None:
            _check_containment(name, cmap, ev, gc)
    return gc


def _check_containment(name: str, cmap, ev, gc: GuestCheck) -> None:
    """Every guest event of the tcg method's evidence must be mapped inside a running
    interval of its vCPU's host thread: one violation per event mapped into an
    off-CPU gap (a map shifted past its bound puts the events at the band's edge there)."""
    from vmtrace.clocksync import containment

    bad = containment.gap_events(ev.g, ev.th, ev.on, cmap.offset_for)
    gc.events_checked += len(ev.g)
    for x, d in bad:
        h = int(cmap.to_host(np.array([x], dtype=np.int64))[0])
        ns = int(round(d / ev.clock.per_ns))
        gc.violations.append(Violation(name, "guest event (raw ts %d) in its vCPU thread's off-CPU gap" % x,
                                       h, h + ns, h + ns))


def _tcg_evidence(session, name: str):
    """The tcg method's evidence for this guest, when that method mapped it."""
    session.clock_map(name)
    return getattr(session, "_tcg_evidence", {}).get(name)


def _marker_cpu(session, name: str, ts: int) -> int:
    for mts, cpu, _k, _kv in session.markers(name):
        if mts == ts:
            return cpu
    return 0


def _check_orders(session, name: str, cmap: ClockMap, gc: GuestCheck) -> None:
    """Orders are ``[kind, host_send_ns, host_ack_ns, seq]`` (``seq`` optional, ack None
    when the agent never acknowledged). An order whose agent wrote
    ``vmtrace-order kind=K seq=N`` is checked like a probe, paired by seq; orders without
    seq are paired with the markers of their kind in order."""
    orders = session.source(name).orders
    if not orders:
        return
    by_seq: Dict[tuple, tuple] = {}
    by_kind: Dict[str, list] = {}
    for ts, cpu, k, kv in session.markers(name):
        if k != "order":
            continue
        kind = str(kv.get("kind"))
        by_kind.setdefault(kind, []).append((ts, cpu))
        seq = marker_seq(kv)
        if seq is not None:
            by_seq.setdefault((kind, seq), (ts, cpu))
    seen: Dict[str, int] = {}
    parsed = []
    for o in orders:
        try:
            kind, send = str(o[0]), int(o[1])
            ack = None if o[2] is None else int(o[2])
            seq = int(o[3]) if len(o) > 3 and o[3] is not None else None
        except (TypeError, ValueError, IndexError):
            raise VmtraceError("guest %s: bad order entry %r in session.json" % (name, o))
        parsed.append((kind, send, ack))
        i = seen.get(kind, 0)
        seen[kind] = i + 1
        mark = by_seq.get((kind, seq)) if seq is not None else (
            by_kind[kind][i] if i < len(by_kind.get(kind, [])) else None)
        if mark is None:
            continue
        ts, cpu = mark
        h = int(cmap.to_host(np.array([ts], dtype=np.int64), np.array([cpu]))[0])
        label = "order %s %s marker" % (kind, "seq=%d" % seq if seq is not None else "#%d" % (i + 1))
        if ack is None:
            _within(name, label, h, send, 1 << 62, gc)   # never acknowledged: only a lower bound
        else:
            _within(name, label, h, send, ack, gc)
        gc.orders_checked += 1
    # Without order markers, the trace itself is bounded by the first start and last stop.
    starts = [send for kind, send, _ack in parsed if kind in ("start", "1")]
    stops = [ack for kind, _send, ack in parsed if kind in ("stop", "0") and ack is not None]
    if not (starts or stops):
        return
    first = last = None
    for e in session.events(name, cmap):
        if first is None:
            first = e
        last = e
    if first is None:
        gc.notes.append("guest trace is empty")
        return
    if starts:
        _within(name, "first event (%s) after start" % first.event, first.ts, min(starts), 1 << 62, gc)
        gc.orders_checked += 1
    if stops:
        _within(name, "last event (%s) before stop ack" % last.event, last.ts, -(1 << 62), max(stops), gc)
        gc.orders_checked += 1


def check_session(session, *, skew_ns: int = 0, holdout: bool = False,
                  guests: Optional[List[str]] = None) -> CheckResult:
    res = CheckResult()
    for name in guests or session.guests:
        res.guests[name] = check_guest(session, name, skew_ns=skew_ns, holdout=holdout)
    return res
