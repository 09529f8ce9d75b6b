"""Where the pumps run.

The seed bound each pump to the CPU whose buffer it reads. Measured on the development
machine (pingpong on CPU0, sched+timer+kmem, 4 MB per CPU): readers bound that way cost
the workload 3.5-4.2 %, because every wake-up and splice preempts the traced task on its
own CPU; the same splice+poll reader on the idle CPU1 cost 0.22 %. So by default
(``auto``) all pumps share the least-busy CPUs, chosen from /proc/stat and re-evaluated
while running, skipping CPUs isolated for workloads (``isolated``, ``nohz_full``).
``percpu`` keeps the seed's binding; a CPU list pins them.

"Busy" means busy with work the pumps should yield to. Like the scheduler, which treats
a CPU running only ``SCHED_IDLE`` tasks as idle, we do not count the time of
``SCHED_IDLE`` tasks and of ``nice 19`` batch work (a pump at nice -10 preempts them at
once), nor the pumps' own time. Counting them once put every pump beside an event-heavy
workload while the other CPU ran only a batch job, and a million events were lost per
run (issue 17). And a pump never shares the CPU whose buffer it drains while another
CPU is allowed: its wake-ups would preempt exactly the task it records.
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
SCHED_IDLE_POLICY = 5
LOW_NICE = 19    # batch work at this nice value yields to the pumps as SCHED_IDLE does
RESCAN_EVERY = 10  # evaluations between full scans of /proc for low-priority tasks


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


def busy_fraction(before: Dict[int, Tuple[int, int]], after: Dict[int, Tuple[int, int]],
                  discount: Optional[Dict[int, int]] = None) -> Dict[int, float]:
    """Share of each CPU's time that was busy, less ``discount`` (cpu -> jiffies of work
    that does not count: low-priority tasks and our own threads)."""
    out = {}
    discount = discount or {}
    for cpu, (b1, t1) in after.items():
        b0, t0 = before.get(cpu, (0, 0))
        dt = t1 - t0
        busy = max(0, b1 - b0 - discount.get(cpu, 0))
        out[cpu] = min(1.0, busy / dt) if dt > 0 else 0.0
    return out


def task_sample(stat_path: str) -> Optional[Tuple[int, int, int, int]]:
    """(utime+stime jiffies, nice, cpu last run on, policy) of one task, from its stat."""
    try:
        with open(stat_path, "rb") as f:
            text = f.read()
    except OSError:
        return None
    # the comm field may hold spaces and parentheses: fields start after the last ')'
    fields = text[text.rfind(b")") + 2:].split()
    try:
        return (int(fields[11]) + int(fields[12]), int(fields[16]), int(fields[36]), int(fields[38]))
    except (IndexError, ValueError):
        return None


def low_priority_tasks(own_pid: int, proc: str = "/proc") -> List[str]:
    """stat paths of every task that does not count as load: ``SCHED_IDLE``, nice 19,
    and our own threads. A full scan; callers repeat it only now and then."""
    out: List[str] = []
    try:
        pids = [p for p in os.listdir(proc) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        task_dir = os.path.join(proc, pid, "task")
        try:
            tids = os.listdir(task_dir)
        except OSError:
            continue
        for tid in tids:
            path = os.path.join(task_dir, tid, "stat")
            if int(pid) == own_pid:
                out.append(path)
                continue
            sample = task_sample(path)
            if sample and (sample[3] == SCHED_IDLE_POLICY or sample[1] >= LOW_NICE):
                out.append(path)
    return out


class Discount:
    """Jiffies spent per CPU by tasks that do not count as load, between two calls."""

    def __init__(self, own_pid: int, proc: str = "/proc"):
        self.own_pid, self.proc = own_pid, proc
        self._paths: List[str] = []
        self._last: Dict[str, int] = {}
        self._calls = 0

    def take(self) -> Dict[int, int]:
        if self._calls % RESCAN_EVERY == 0:
            self._paths = low_priority_tasks(self.own_pid, self.proc)
        self._calls += 1
        out: Dict[int, int] = {}
        seen: Dict[str, int] = {}
        for path in self._paths:
            sample = task_sample(path)
            if sample is None:
                continue
            ticks, _nice, cpu, _policy = sample
            seen[path] = ticks
            if path in self._last:
                out[cpu] = out.get(cpu, 0) + max(0, ticks - self._last[path])
        self._last = seen
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
        self._discount = Discount(os.getpid())
        self._discount.take()
        self._last = cpu_times()

    def _busy(self) -> Dict[int, float]:
        discount = self._discount.take()
        now = cpu_times()
        busy = busy_fraction(self._last, now, discount)
        self._last = now
        return busy

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
            self.current = least_busy(self._busy(), self.candidates) or list(self.candidates)
        return self.current

    def apply(self, tids: Dict[int, Optional[int]], main_tid: int) -> None:
        """tids: traced cpu -> pump thread id."""
        if self.mode == PERCPU:
            for cpu, tid in tids.items():
                if tid is not None:
                    _setaff(tid, [cpu])
            return
        if self.current:
            for cpu, tid in tids.items():
                if tid is not None:
                    _setaff(tid, away_from(cpu, self.current))
            _setaff(main_tid, self.current)

    def reevaluate(self, tids: Dict[int, Optional[int]], main_tid: int) -> bool:
        """For ``auto``: move the pumps if their CPUs became busier than others."""
        if self.mode != AUTO or len(self.candidates) < 2:
            return False
        busy = self._busy()
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


def away_from(cpu: int, allowed: List[int]) -> List[int]:
    """Where the pump of ``cpu`` may run: ``allowed`` without its own CPU, unless that
    is all there is."""
    return [c for c in allowed if c != cpu] or list(allowed)


def _setaff(tid: int, cpus: List[int]) -> None:
    try:
        os.sched_setaffinity(tid, cpus)
    except OSError:
        pass  # a CPU went offline, or the thread ended
