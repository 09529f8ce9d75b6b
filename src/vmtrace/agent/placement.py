"""Where the pumps run.

The seed bound each pump to the CPU whose buffer it reads. Measured on the development
machine (pingpong on CPU0, sched+timer+kmem, 4 MB per CPU): readers bound that way cost
the workload 3.5-4.2 %, because every wake-up and splice preempts the traced task on its
own CPU; the same splice+poll reader on the idle CPU1 cost 0.22 %. So by default
(``auto``) all pumps share the least-busy CPUs, chosen from /proc/stat and re-evaluated
while running, skipping CPUs isolated for workloads (``isolated``, ``nohz_full``).
``percpu`` keeps the seed's binding; a CPU list pins them.
"""
from __future__ import annotations

import os
import time
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import parse_cpu_list

AUTO, PERCPU = "auto", "percpu"
SLACK = 0.10  # CPUs within 10 points of the least busy one are as good
STICKY = 0.20  # keep the current set unless it is this much busier than the best


def parse_mode(text: str, online: Sequence[int]) -> "str | List[int]":
    t = text.strip().lower()
    if t in (AUTO, ""):
        return AUTO
    if t in (PERCPU, "bound", "seed"):
        return PERCPU
    cpus = parse_cpu_list(text)
    bad = [c for c in cpus if c not in online]
    if not cpus or bad:
        raise VmtraceError("--pump-cpus %s: CPU %s not online (online: %s)"
                           % (text, ",".join(map(str, bad)) or "none", ",".join(map(str, online))))
    return cpus


def _read_sysfs_list(path: str) -> List[int]:
    try:
        with open(path) as f:
            return parse_cpu_list(f.read().strip())
    except (OSError, VmtraceError):
        return []


def housekeeping(online: Sequence[int]) -> List[int]:
    avoid = set(_read_sysfs_list("/sys/devices/system/cpu/isolated"))
    avoid |= set(_read_sysfs_list("/sys/devices/system/cpu/nohz_full"))
    hk = [c for c in online if c not in avoid]
    return hk or list(online)


def cpu_times(path: str = "/proc/stat") -> Dict[int, Tuple[int, int]]:
    """cpu -> (busy, total) jiffies."""
    out: Dict[int, Tuple[int, int]] = {}
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        parts = line.split()
        try:
            cpu = int(parts[0][3:])
            vals = [int(v) for v in parts[1:]]
        except ValueError:
            continue
        idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
        total = sum(vals[:8])
        out[cpu] = (total - idle, total)
    return out


def busy_fraction(before: Dict[int, Tuple[int, int]], after: Dict[int, Tuple[int, int]]) -> Dict[int, float]:
    out = {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        dt = t1 - t0
        out[cpu] = (b1 - b0) / dt if dt > 0 else 0.0
    return out


def least_busy(busy: Dict[int, float], candidates: Iterable[int]) -> List[int]:
    cands = [c for c in candidates if c in busy] or list(candidates)
    if not cands:
        return []
    best = min(busy.get(c, 0.0) for c in cands)
    return sorted(c for c in cands if busy.get(c, 0.0) <= best + SLACK)


class Placement:
    """Applies the pump CPU policy to thread ids, and re-evaluates it for ``auto``."""

    def __init__(self, mode: "str | List[int]", online: Sequence[int]):
        self.mode = mode
        self.online = list(online)
        self.candidates = housekeeping(self.online)
        self.current: Optional[List[int]] = None
        self._last = cpu_times()

    def describe(self) -> str:
        if self.mode == PERCPU:
            return "percpu"
        return ",".join(map(str, self.current or [])) or "any"

    def initial(self) -> Optional[List[int]]:
        """The set for the agent's main thread (pump threads inherit it)."""
        if self.mode == PERCPU:
            return None
        if isinstance(self.mode, list):
            self.current = list(self.mode)
        else:
            # a short first look, so the pumps start away from a busy workload
            time.sleep(0.2)
            now = cpu_times()
            self.current = least_busy(busy_fraction(self._last, now), self.candidates) or list(self.candidates)
            self._last = now
        return self.current

    def apply(self, tids: Dict[int, Optional[int]], main_tid: int) -> None:
        """tids: traced cpu -> pump thread id."""
        if self.mode == PERCPU:
            for cpu, tid in tids.items():
                if tid is not None:
                    _setaff(tid, [cpu])
            return
        if self.current:
            for tid in list(tids.values()) + [main_tid]:
                if tid is not None:
                    _setaff(tid, self.current)

    def reevaluate(self, tids: Dict[int, Optional[int]], main_tid: int) -> bool:
        """For ``auto``: move the pumps if their CPUs became busier than others."""
        if self.mode != AUTO or len(self.candidates) < 2:
            return False
        now = cpu_times()
        busy = busy_fraction(self._last, now)
        self._last = now
        best = least_busy(busy, self.candidates)
        if not best or best == self.current:
            return False
        if self.current:
            cur = max(busy.get(c, 0.0) for c in self.current)
            if cur <= min(busy.get(c, 0.0) for c in best) + STICKY and set(self.current) != set(self.candidates):
                return False
        self.current = best
        self.apply(tids, main_tid)
        return True


def _setaff(tid: int, cpus: List[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:
        pass  # a CPU went offline, or the thread ended
