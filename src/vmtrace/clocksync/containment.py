"""The containment estimator: a constant clock offset from when vCPU threads ran.

A guest event is stamped while its vCPU executes guest code, and a TCG vCPU executes
only while its QEMU thread is on a host CPU. So for the right offset ``O`` (guest clock
minus host clock, both the same TSC under TCG: docs/timeline.md), every guest event
``g`` of vCPU ``k`` has ``g - O`` inside an on-CPU interval of thread(k) on the host.
Each event cuts the set of offsets that satisfy this; intersected over thousands of
events (cpu_idle enter/exit sit right at the thread's switch-out and switch-in) the set
shrinks to a few microseconds. No pairing, no round trip, no assumption about delays.

Under TCG the offset is one constant while the VM runs and jumps only when QEMU stops
the VM (``stop``/``cont``, savevm/loadvm, migration). A jump shows as an event no offset
of the current set explains; the estimator then starts a new *segment* from a coarse
prior (the time probes), after checking that the event is not a lone outlier.

Host kernels occasionally fail to record a thread's switch-in (measured: 12 in 17 500
on 6.18). An off-CPU gap is therefore trusted only when the thread's next switch event
is a switch-in and the thread did nothing in between (:func:`oncpu_intervals`).

Pure: arrays in, intervals out. Times are integers in one unit (TSC cycles or ns).
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

Interval = Tuple[int, int]
NEG = -(1 << 62)
POS = 1 << 62
LOOKAHEAD = 32          # events that must still fit the old set for a misfit to be an outlier


@dataclass
class HostSwitch:
    """One host scheduler record of a watched thread, on the host's clock.

    ``kind``: ``"in"`` (switched in), ``"out"`` (switched out, ``state`` its prev_state,
    ``other`` the task that ran next), ``"wakeup"`` (woken), ``"own"`` (an event the
    thread emitted itself, which proves it was on a CPU)."""

    ts: int
    tid: int
    kind: str
    state: str = ""
    other: str = ""


@dataclass
class OnCpu:
    """A host thread's may-be-running intervals: the complement of its trusted gaps."""

    starts: List[int]
    ends: List[int]
    gaps_trusted: int = 0
    gaps_dropped: int = 0


def oncpu_intervals(records: Iterable[HostSwitch], tids: Iterable[int]) -> Dict[int, OnCpu]:
    """Per thread, the intervals during which it may have been on a CPU.

    An off-CPU gap runs from a switch-out to the next switch-in. It is dropped when a
    second switch-out comes first (the kernel lost the switch-in) or when the thread
    emits an event inside it; a trailing switch-out with no switch-in is not a gap
    (the recording ended). Before the first record and after the last everything is
    allowed."""
    want = set(tids)
    gaps: Dict[int, List[Interval]] = {t: [] for t in want}
    out_at: Dict[int, Optional[int]] = {t: None for t in want}
    dropped = {t: 0 for t in want}
    for r in sorted(records, key=lambda r: r.ts):
        if r.tid not in want:
            continue
        t = r.tid
        if r.kind == "in":
            if out_at[t] is not None and r.ts >= out_at[t]:
                gaps[t].append((out_at[t], r.ts))
            out_at[t] = None
        elif r.kind == "out":
            if out_at[t] is not None:
                dropped[t] += 1
            out_at[t] = r.ts
        elif r.kind == "own" and out_at[t] is not None:
            dropped[t] += 1
            out_at[t] = None
    res = {}
    for t in want:
        S, E = [NEG], []
        for a, b in gaps[t]:
            if b <= a:
                continue
            E.append(a)
            S.append(b)
        E.append(POS)
        res[t] = OnCpu(S, E, len(gaps[t]), dropped[t])
    return res


def shrink(C: List[Interval], g: int, on: OnCpu) -> List[Interval]:
    """The offsets of ``C`` for which ``g - O`` lies in one of ``on``'s intervals."""
    S, E = on.starts, on.ends
    new: List[Interval] = []
    for a, b in C:
        hlo, hhi = g - b, g - a
        j = bisect.bisect_left(E, hlo)
        while j < len(S) and S[j] <= hhi:
            x0, x1 = max(S[j], hlo), min(E[j], hhi)
            if x0 <= x1:
                new.append((g - x1, g - x0))
            j += 1
    if len(new) <= 1:
        return new
    new.sort()
    merged = [new[0]]
    for a, b in new[1:]:
        if a <= merged[-1][1] + 1:
            merged[-1] = (merged[-1][0], max(merged[-1][1], b))
        else:
            merged.append((a, b))
    return merged


def contained(g: int, O: int, on: OnCpu) -> bool:
    """Whether host time ``g - O`` lies in one of the thread's may-be-running intervals."""
    h = g - O
    j = bisect.bisect_left(on.ends, h)
    return j < len(on.starts) and on.starts[j] <= h


def gap_distance(g: int, O: int, on: OnCpu) -> int:
    """How far ``g - O`` lies inside an off-CPU gap (0 when it is in a running interval)."""
    h = g - O
    j = bisect.bisect_left(on.ends, h)
    if j < len(on.starts) and on.starts[j] <= h:
        return 0
    left = h - on.ends[j - 1] if j > 0 else POS
    right = on.starts[j] - h if j < len(on.starts) else POS
    return int(min(left, right))


@dataclass
class Segment:
    """A stretch of guest time with one offset: ``band`` is every offset consistent
    with all its events (sorted disjoint pieces); ``offset`` the one used."""

    first: int            # guest ts of its first and last event
    last: int
    band: List[Interval]
    events: int = 0
    outliers: int = 0
    prior: Interval = (0, 0)

    @property
    def lo(self) -> int:
        return self.band[0][0]

    @property
    def hi(self) -> int:
        return self.band[-1][1]

    @property
    def offset(self) -> int:
        """The middle of the band, moved into the nearest piece if it falls between."""
        mid = (self.lo + self.hi) // 2
        best = None
        for a, b in self.band:
            if a <= mid <= b:
                return mid
            d = min(abs(mid - a), abs(mid - b))
            if best is None or d < best[0]:
                best = (d, a if abs(mid - a) < abs(mid - b) else b)
        return best[1]

    @property
    def half_width(self) -> float:
        """Worst distance of the true offset (somewhere in the band) from ``offset``."""
        o = self.offset
        return float(max(o - self.lo, self.hi - o))


@dataclass
class Estimate:
    segments: List[Segment] = field(default_factory=list)
    unexplained: int = 0        # events no prior could place (counted, skipped)
    events: int = 0


def _fits_all(C: List[Interval], g: np.ndarray, thr: np.ndarray, on: Dict[int, OnCpu], i: int, n: int) -> bool:
    for k in range(i, min(i + n, len(g))):
        th = int(thr[k])
        if th in on and not shrink(C, int(g[k]), on[th]):
            return False
    return True


def _quick_ok(C: List[Interval], g: np.ndarray, thr: np.ndarray, on: Dict[int, OnCpu]) -> np.ndarray:
    """Events that cannot shrink C: g - O lies in one running interval for every O of
    C's hull. Checked in bulk, so the Python loop only sees the events that matter."""
    lo, hi = C[0][0], C[-1][1]
    ok = np.zeros(len(g), dtype=bool)
    for th, o in on.items():
        sel = np.nonzero(thr == th)[0]
        if not len(sel):
            continue
        S = np.asarray(o.starts, dtype=np.int64)
        E = np.asarray(o.ends, dtype=np.int64)
        hlo, hhi = g[sel] - hi, g[sel] - lo
        j = np.searchsorted(E, hlo, side="left")
        jj = np.minimum(j, len(S) - 1)
        ok[sel] = (j < len(S)) & (S[jj] <= hlo) & (E[jj] >= hhi)
    return ok


def estimate(g: Sequence[int], thr: Sequence[int], on: Dict[int, OnCpu],
             prior: Callable[[int], Sequence[Interval]], chunk: int = 2048) -> Estimate:
    """Constant offset per segment from guest events ``g`` (guest clock, time order)
    run by host threads ``thr`` (one per event), with ``on`` the threads' running
    intervals and ``prior(guest_ts)`` candidate offset ranges to start a segment from
    (the first that explains the most of the following events is taken)."""
    g = np.asarray(g, dtype=np.int64)
    thr = np.asarray(thr, dtype=np.int64)
    keep = np.isin(thr, np.array(list(on), dtype=np.int64))
    g, thr = g[keep], thr[keep]
    est = Estimate(events=len(g))
    n = len(g)
    i = 0
    seg: Optional[Segment] = None
    C: List[Interval] = []
    ok = np.zeros(0, dtype=bool)
    ok_from = 0
    while i < n:
        if seg is None:
            best = None
            for lo, hi in prior(int(g[i])):
                C0 = shrink([(int(lo), int(hi))], int(g[i]), on[int(thr[i])])
                if not C0:
                    continue
                k = i + 1
                Ck = C0
                while k < min(n, i + 1 + 4 * LOOKAHEAD):
                    Cn = shrink(Ck, int(g[k]), on[int(thr[k])])
                    if not Cn:
                        break
                    Ck, k = Cn, k + 1
                if best is None or k > best[0]:
                    best = (k, C0, (int(lo), int(hi)))
            if best is None:
                est.unexplained += 1
                i += 1
                continue
            C = best[1]
            seg = Segment(int(g[i]), int(g[i]), C, 1, 0, best[2])
            i += 1
            ok = np.zeros(0, dtype=bool)
            continue
        if i >= ok_from + len(ok):
            ok_from = i
            ok = _quick_ok(C, g[i:i + chunk], thr[i:i + chunk], on)
        if ok[i - ok_from]:
            seg.events += 1
            seg.last = int(g[i])
            i += 1
            continue
        Cn = shrink(C, int(g[i]), on[int(thr[i])])
        if Cn:
            C = Cn      # events found fine for a wider set stay fine for this one
            seg.events += 1
            seg.last = int(g[i])
            i += 1
            continue
        if _fits_all(C, g, thr, on, i + 1, LOOKAHEAD):
            seg.outliers += 1
            i += 1
            continue
        seg.band = C
        est.segments.append(seg)
        seg = None
    if seg is not None:
        seg.band = C
        est.segments.append(seg)
    return est


def gap_events(g: Sequence[int], thr: Sequence[int], on: Dict[int, OnCpu], offset_of: Callable[[int], int],
               slack: int = 0) -> List[Tuple[int, int]]:
    """Guest events that the chosen offsets put inside an off-CPU gap of their thread
    by more than ``slack``: ``[(guest_ts, distance)]``."""
    out = []
    for x, th in zip(np.asarray(g).tolist(), np.asarray(thr).tolist()):
        o = on.get(th)
        if o is None:
            continue
        d = gap_distance(x, offset_of(x), o)
        if d > slack:
            out.append((x, d))
    return out
