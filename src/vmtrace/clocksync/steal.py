"""What the host did to each vCPU: its thread's running, waiting and sleeping time.

From the host's scheduler record of the vCPU threads (the same record the tcg clock sync
reads, :mod:`vmtrace.clocksync.hostsched`), a state machine per thread:

* ``running``: from a switch-in to the next switch-out;
* ``preempted``: switched out while runnable (``prev_state`` R): the vCPU wanted to run
  and the host ran ``other`` instead: steal;
* ``waking``: woken from sleep (a guest interrupt after HLT) and waiting for a CPU:
  also steal, the guest's wake-up is delayed;
* ``sleeping``: switched out blocked (the vCPU halted, or QEMU waits on a lock).

A thread that emits an event while "switched out" ran: the kernel lost its switch-in
(hostsched's docstring), and it is running from that event on. Steal is
``(preempted + waking) / (running + preempted + waking)``. With ``thread=single`` one
thread runs every vCPU and steal cannot be split per vCPU; the table says so.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from vmtrace.clocksync.containment import HostSwitch

STEAL_STATES = ("preempted", "waking")


@dataclass
class Span:
    start: int
    end: int
    state: str
    other: str = ""      # for preempted: the host task that was switched in instead


@dataclass
class ThreadStates:
    tid: int
    spans: List[Span] = field(default_factory=list)

    def total(self, state: str) -> int:
        return sum(s.end - s.start for s in self.spans if s.state == state)

    @property
    def steal(self) -> int:
        return sum(self.total(s) for s in STEAL_STATES)

    @property
    def longest_steal(self) -> Optional[Span]:
        st = [s for s in self.spans if s.state in STEAL_STATES]
        return max(st, key=lambda s: s.end - s.start) if st else None

    def top_others(self, n: int = 3) -> List[Tuple[str, int]]:
        acc: Dict[str, int] = defaultdict(int)
        for s in self.spans:
            if s.state == "preempted":
                acc[s.other] += s.end - s.start
        return sorted(acc.items(), key=lambda kv: -kv[1])[:n]


def states(records: Iterable[HostSwitch], tids: Iterable[int], end: Optional[int] = None) -> Dict[int, ThreadStates]:
    """Per thread, its spans in the record's time order (open spans end at ``end``)."""
    want = set(tids)
    out = {t: ThreadStates(t) for t in want}
    cur: Dict[int, Tuple[str, int, str]] = {}
    last = 0

    def go(t: int, ts: int, state: str, other: str = "") -> None:
        if t in cur:
            s, since, o = cur[t]
            if ts > since:
                out[t].spans.append(Span(since, ts, s, o))
        cur[t] = (state, ts, other)

    for r in sorted(records, key=lambda r: r.ts):
        if r.tid not in want:
            continue
        last = max(last, r.ts)
        state = cur.get(r.tid, ("", 0, ""))[0]
        if r.kind == "in":
            go(r.tid, r.ts, "running")
        elif r.kind == "out":
            go(r.tid, r.ts, "preempted" if r.state.startswith("R") else "sleeping", r.other)
        elif r.kind == "wakeup" and state == "sleeping":
            go(r.tid, r.ts, "waking")
        elif r.kind == "own" and state in ("sleeping", "preempted", "waking"):
            go(r.tid, r.ts, "running")
    stop = end if end is not None else last
    for t, (s, since, o) in cur.items():
        if stop > since:
            out[t].spans.append(Span(since, stop, s, o))
    return out


def mapped(st: Dict[int, ThreadStates], to_host: Callable[[np.ndarray], np.ndarray]) -> Dict[int, ThreadStates]:
    """The same spans on another clock (the session's, through the tcg anchors)."""
    res = {}
    for t, ts in st.items():
        if not ts.spans:
            res[t] = ThreadStates(t)
            continue
        a = to_host(np.array([s.start for s in ts.spans], dtype=np.int64)).tolist()
        b = to_host(np.array([s.end for s in ts.spans], dtype=np.int64)).tolist()
        res[t] = ThreadStates(t, [Span(x, y, s.state, s.other) for x, y, s in zip(a, b, ts.spans)])
    return res


def clipped(st: Dict[int, ThreadStates], lo: int, hi: int) -> Dict[int, ThreadStates]:
    """Only the parts of the spans inside [lo, hi]."""
    return {t: ThreadStates(t, [Span(max(s.start, lo), min(s.end, hi), s.state, s.other) for s in ts.spans
                                if s.end > lo and s.start < hi]) for t, ts in st.items()}


def session_states(session, name: str, lo: Optional[int] = None,
                   hi: Optional[int] = None) -> Tuple[Dict[int, int], Dict[int, ThreadStates]]:
    """(cpu -> thread, thread -> states on the session's clock, within [lo, hi] when
    given) for a guest recorded with the host vCPU record; VmtraceError when it was not."""
    from vmtrace.clocksync import hostsched, tcg
    from vmtrace.errors import VmtraceError

    src = session.source(name)
    sync = src.sync or {}
    if "vcpu_threads" not in sync or "file" not in sync:
        raise VmtraceError("guest %s: no host record of its vCPU threads (record with --host-events on a TCG "
                           "guest whose QEMU has -qmp or -name ...,debug-threads=on)%s"
                           % (name, ": " + str(sync.get("why"))[:200] if sync.get("why") else ""))
    where = "session.json: guest %s: sync" % name
    cpu2tid = hostsched.thread_map(sync["vcpu_threads"], where)
    hs = hostsched.read(session._file(sync["file"], name + " sync"), cpu2tid.values())
    anchors = [(lo, hs.anchors[seq], hi) for seq, lo, hi in hostsched.anchors_from(sync.get("anchors") or [], where)
               if seq in hs.anchors]
    clock = tcg.AnchorClock(anchors)
    res = mapped(states(hs.switches, cpu2tid.values(), hs.last), clock.to_mono)
    if lo is not None or hi is not None:
        res = clipped(res, lo if lo is not None else -(1 << 62), hi if hi is not None else 1 << 62)
    return cpu2tid, res
