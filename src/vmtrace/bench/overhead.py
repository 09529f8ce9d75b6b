"""The seed's overhead evaluation, repeated on this machine's tracefs.

Method (seeds/002): trace sched, timer and kmem; run a workload pinned to one CPU;
overhead = (1 - score with a collector / score with ftrace only) x 100. We run every
collector once per repetition, rotating their order from one repetition to the next so
that slow drift of a shared machine does not always hit the same collector, and compare
each collector with the native run of the same repetition.

All tracing happens in a private tracefs instance with a fixed 4096 KB per-CPU buffer,
cleared before each run; the instance is removed at the end even on Ctrl-C.

Fairness on few CPUs: on the development machine (a 2-vCPU microVM) pingpong pinned to
CPU0 scored about 30 % more whenever CPU1 was busy than when CPU1 sat idle (halted), so
any collector whose threads run on CPU1 looked *faster* than native. Holding
``/dev/cpu_dma_latency`` at 0 (guest idle = polling) did not remove the effect there, a
busy CPU1 did. So by default every non-workload CPU runs an :class:`IdleSpinner` for
the whole benchmark, in every configuration including off and native: a busy loop at
``SCHED_IDLE``, which any normal thread (a collector's) preempts at once and which the
scheduler's wake-up placement counts as an idle CPU. Its CPU time per run is recorded:
what it lost in a run is roughly what the collector used on those CPUs.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vmtrace.bench import collectors as coll
from vmtrace.bench import stats
from vmtrace.lab import peers
from vmtrace.bench.ownshare import own_share
from vmtrace.errors import VmtraceError
from vmtrace.tracefs import CpuStats, Tracefs

EVENTS = ("sched", "timer", "kmem")
BUFFER_KB = 4096
WORKLOADS = {"intloop": "iterations/s", "pingpong": "round trips/s"}
# What else the traced machine is doing, as real guests do (issue 17). In every one the
# load is the same for every collector, started before any of them.
SCENARIOS = {
    "batch": "a batch job (busy loop at SCHED_IDLE) on every other CPU; the workload pinned to one",
    "moving": "as batch, and the workload moves to the next CPU every %g s" % 0.25,
    "busy": "every other CPU busy with a normal-priority loop; the workload pinned to one",
}
MOVE_EVERY_S = 0.25


@dataclass
class Config:
    seconds: float = 5.0
    reps: int = 3
    workloads: Sequence[str] = ("intloop", "pingpong")
    collectors: Sequence[str] = coll.NAMES
    workload_cpu: int = 0
    settle: float = 0.3          # let a collector open its files before the workload starts
    quick: bool = False
    events: Sequence[str] = EVENTS
    buffer_kb: int = BUFFER_KB
    spinner: bool = True         # keep the non-workload CPUs busy at SCHED_IDLE (see module doc)
    scenario: str = "batch"      # one of SCENARIOS
    own_share: bool = True       # decode each agent's output to count its own events

    @classmethod
    def quick_config(cls) -> "Config":
        """Under 60 s: the event-heavy workload only, 2 s runs, 2 repetitions."""
        return cls(seconds=2.0, reps=2, workloads=("pingpong",), quick=True)


Progress = Callable[[str], None]

_PR_SET_PDEATHSIG = 1
_SPIN = "while True: pass"


def _spinner_preexec(cpu: int, idle: bool = True) -> Callable[[], None]:
    def setup() -> None:  # in the child, between fork and exec
        try:
            ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except Exception:
            pass
        os.sched_setaffinity(0, {cpu})
        if idle:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    return setup


def _proc_cpu_seconds(pid: int) -> Optional[float]:
    """utime+stime of a live process from /proc/PID/stat."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_pressure_total() -> Optional[int]:
    """Microseconds some task waited for a CPU (PSI ``/proc/pressure/cpu``), or None."""
    try:
        with open("/proc/pressure/cpu") as f:
            return int(f.readline().split("total=")[1])
    except (OSError, IndexError, ValueError):
        return None


class IdleSpinner:
    """One busy loop per given CPU at SCHED_IDLE priority, for as long as it is started.

    Keeps those CPUs out of idle (halt) in every configuration alike, without taking
    time from any normal thread. Dies with us (PR_SET_PDEATHSIG) if we are killed.
    """

    policy = "SCHED_IDLE"

    def __init__(self, cpus: Sequence[int], idle: bool = True):
        self.cpus = list(cpus)
        self.idle = idle
        if not idle:
            self.policy = "SCHED_OTHER"
        self.procs: Dict[int, subprocess.Popen] = {}
        self._pids_seen: List[int] = []

    def start(self) -> "IdleSpinner":
        try:
            for cpu in self.cpus:
                self.procs[cpu] = subprocess.Popen(
                    [sys.executable, "-S", "-c", _SPIN], stdin=subprocess.DEVNULL,
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=_spinner_preexec(cpu, self.idle))
                self._pids_seen.append(self.procs[cpu].pid)
        except (OSError, subprocess.SubprocessError) as exc:
            self.stop()
            raise VmtraceError("cannot start the idle spinner: %s" % exc)
        return self

    @property
    def pids(self) -> List[int]:
        return [p.pid for p in self.procs.values()]

    def running(self) -> bool:
        return bool(self.procs) and all(p.poll() is None for p in self.procs.values())

    def cpu_seconds(self) -> Optional[float]:
        """CPU seconds the spinners have had so far (None when not running)."""
        if not self.running():
            return None
        vals = [_proc_cpu_seconds(p.pid) for p in self.procs.values()]
        return None if any(v is None for v in vals) else sum(vals)

    def stop(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                pass
        self.procs = {}

    def __enter__(self) -> "IdleSpinner":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def describe(self) -> dict:
        return {"enabled": True, "cpus": self.cpus, "policy": self.policy, "pids": self._pids_seen,
                "what": "busy loop per non-workload CPU at %s for the whole run, in every configuration"
                        % self.policy}


def run_workload(exe: Path, seconds: float, cpu: int, move_over: Sequence[int] = ()) -> float:
    """Run a workload pinned to ``cpu`` and return the score it prints. With
    ``move_over``, its processes are moved to the next of those CPUs every
    :data:`MOVE_EVERY_S` (a workload that the scheduler migrates)."""
    proc = subprocess.Popen([str(exe), "%g" % seconds], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    stop_moving = threading.Event()
    mover = None
    if len(move_over) > 1:
        mover = threading.Thread(target=_keep_moving, args=(proc.pid, list(move_over), cpu, stop_moving),
                                 daemon=True)
        mover.start()
    try:
        out, _err = proc.communicate(timeout=seconds + 60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise VmtraceError("workload %s did not finish within %g s" % (exe.name, seconds + 60))
    finally:
        stop_moving.set()
        if mover:
            mover.join(5)
    try:
        score = float(out.strip().splitlines()[-1])
    except (ValueError, IndexError):
        score = float("nan")
    if proc.returncode != 0 or not score > 0:
        raise VmtraceError("workload %s failed (exit %d): %r" % (exe.name, proc.returncode, out[-200:]))
    return score


def _keep_moving(pid: int, cpus: List[int], first: int, stop: threading.Event) -> None:
    """Move every thread of ``pid`` and of its children to the next CPU, periodically."""
    k = cpus.index(first) if first in cpus else 0
    while not stop.wait(MOVE_EVERY_S):
        k = (k + 1) % len(cpus)
        for tid in _family_threads(pid):
            try:
                os.sched_setaffinity(tid, {cpus[k]})
            except OSError:
                pass


def _family_threads(pid: int) -> List[int]:
    """Threads of ``pid`` and of its direct children (pingpong forks one)."""
    out = []
    try:
        kids = open("/proc/%d/task/%d/children" % (pid, pid)).read().split()
    except OSError:
        kids = []
    for p in [pid] + [int(k) for k in kids]:
        try:
            out.extend(int(t) for t in os.listdir("/proc/%d/task" % p))
        except OSError:
            pass
    return out


def _stats(tf: Tracefs, cpus: Sequence[int]) -> Dict[int, CpuStats]:
    return {cpu: tf.cpu_stats(cpu) for cpu in cpus}


def ring_lost(before: Dict[int, CpuStats], after: Dict[int, CpuStats]) -> int:
    """Events the ring buffer overwrote or dropped between two snapshots, over all CPUs."""
    total = 0
    for cpu, a in after.items():
        b = before.get(cpu, CpuStats())
        total += max(0, a.overrun - b.overrun) + max(0, a.dropped_events - b.dropped_events)
    return total


def run_once(collector: coll.Collector, tf: Tracefs, workload: Path, cfg: Config,
             cpus: List[int], reader_cpus: List[int], peer_bins: Dict[str, Path], scratch: Path,
             spinner: Optional[IdleSpinner] = None) -> dict:
    """One measured run: configure, start the collector, run the workload, stop, count."""
    outdir = Path(tempfile.mkdtemp(prefix=collector.name + "-", dir=scratch))
    tf.tracing_on = False
    tf.disable_all_events()
    tf.clear()
    if collector.tracing:
        tf.enable_events(cfg.events)
    before = _stats(tf, cpus)
    report = coll.CollectorReport()
    started = False
    try:
        if collector.tracing:
            tf.tracing_on = True
        collector.start(coll.RunContext(tf, outdir, cpus, reader_cpus, peer_bins))
        started = True
        time.sleep(cfg.settle)
        spin0 = spinner.cpu_seconds() if spinner else None
        psi0 = cpu_pressure_total()
        t_wl = time.monotonic()
        score = run_workload(workload, cfg.seconds, cfg.workload_cpu,
                             move_over=cpus if cfg.scenario == "moving" else ())
        t_wl = time.monotonic() - t_wl
        psi1 = cpu_pressure_total()
        spin1 = spinner.cpu_seconds() if spinner else None
        tf.tracing_on = False
        after = _stats(tf, cpus)
    finally:
        tf.tracing_on = False
        if started:
            report = collector.stop()
        own = None
        try:
            if report.tids and report.raw_output and cfg.own_share:
                own = own_share(outdir, report.tids, tf, cpus)
        finally:
            shutil.rmtree(outdir, ignore_errors=True)
    return {
        "score": score,
        "cpu_seconds": report.cpu_seconds,
        "bytes": report.bytes,
        "lost": ring_lost(before, after) if collector.tracing else 0,
        "lost_reported": report.lost_reported,
        "unread": sum(s.entries for s in after.values()) if collector.tracing else 0,
        "note": report.note,
        # share of the delivered events that are the collector's own threads'
        "own_share": round(own, 5) if own is not None else None,
        # whole-process CPU seconds per 100 MB delivered
        "cpu_per_100mb": (round(report.cpu_seconds / (report.bytes / 1e8), 3)
                          if report.cpu_seconds is not None and report.bytes else None),
        # machine load during the workload: share of the time some task waited for a CPU
        "cpu_pressure": (round((psi1 - psi0) / 1e6 / t_wl, 3) if psi0 is not None and psi1 is not None
                         and t_wl > 0 else None),
        # share of the spinners' CPUs they got during the workload: 1.0 = nobody else ran there
        "spinner_share": (round((spin1 - spin0) / (t_wl * len(spinner.cpus)), 3)
                          if spinner and spin0 is not None and spin1 is not None and t_wl > 0 else None),
    }


def _summary_or_none(values: Sequence[Optional[float]]) -> Optional[dict]:
    vals = [v for v in values if v is not None]
    return stats.summarize(vals).as_dict() if vals else None


def summarize_workload(runs: Dict[str, List[dict]]) -> Dict[str, dict]:
    """Per-collector summaries of one workload's runs; overhead is against ``native``."""
    native = [r["score"] for r in runs.get("native", [])]
    out = {}
    for name, rs in runs.items():
        scores = [r["score"] for r in rs]
        if not scores:
            continue
        out[name] = {
            "scores": scores,
            "score": stats.summarize(scores).as_dict(),
            "overhead_pct": stats.overhead_summary(scores, native) if native else None,
            "cpu_seconds": _summary_or_none([r.get("cpu_seconds") for r in rs]),
            "bytes": _summary_or_none([r.get("bytes") for r in rs]),
            "lost": _summary_or_none([r.get("lost") for r in rs]),
            "lost_reported": _summary_or_none([r.get("lost_reported") for r in rs]),
            "unread": _summary_or_none([r.get("unread") for r in rs]),
            "own_share": _summary_or_none([r.get("own_share") for r in rs]),
            "cpu_per_100mb": _summary_or_none([r.get("cpu_per_100mb") for r in rs]),
            "spinner_share": _summary_or_none([r.get("spinner_share") for r in rs]),
            "cpu_pressure": _summary_or_none([r.get("cpu_pressure") for r in rs]),
            "runs": rs,
        }
    return out


def result_header(setting: str, t0: float, load_start: tuple) -> dict:
    """The fields every overhead result starts with; ``t0`` is the wall-clock start and
    ``load_start`` the load average then. Other tenants of the machine are the main
    noise source, so the load at both ends is kept as evidence."""
    return {
        "benchmark": "overhead",
        "schema": 1,
        "setting": setting,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "duration_s": round(time.time() - t0, 1),
        "loadavg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
    }


def run(cfg: Config, progress: Optional[Progress] = None) -> dict:
    """Run the whole benchmark on the host's tracefs and return the result document."""
    say = progress or (lambda _msg: None)
    if cfg.reps < 1 or cfg.seconds <= 0:
        raise VmtraceError("--reps must be >= 1 and --seconds > 0")
    if cfg.scenario not in SCENARIOS:
        raise VmtraceError("unknown scenario %r (have: %s)" % (cfg.scenario, ", ".join(SCENARIOS)))
    for w in cfg.workloads:
        if w not in WORKLOADS:
            raise VmtraceError("unknown workload %r (have: %s)" % (w, ", ".join(WORKLOADS)))
    if os.geteuid() != 0:
        raise VmtraceError("bench overhead needs root (it creates a tracefs instance)")
    chosen = coll.make(cfg.collectors)
    skipped = {c.name: c.available() for c in chosen if c.available()}
    active = [c for c in chosen if c.name not in skipped]
    if "native" not in [c.name for c in active]:
        raise VmtraceError("the native collector is the reference: it cannot be left out")
    for name, why in skipped.items():
        say("skipping %s: %s" % (name, why))

    say("compiling reference peers")
    peer_bins = peers.build_all()
    online = sorted(os.sched_getaffinity(0))
    if cfg.workload_cpu not in online:
        raise VmtraceError("workload CPU %d is not available (have %s)" % (cfg.workload_cpu, online))
    reader_cpus = [c for c in online if c != cfg.workload_cpu] or [cfg.workload_cpu]

    t0 = time.time()
    load_start = os.getloadavg()
    tf = Tracefs.create_instance("vmtrace-bench-%d" % os.getpid())
    scratch = Path(tempfile.mkdtemp(prefix="vmtrace-bench-"))
    runs: Dict[str, Dict[str, List[dict]]] = {w: {c.name: [] for c in active} for w in cfg.workloads}
    spin_cpus = [c for c in online if c != cfg.workload_cpu]
    busy = cfg.scenario == "busy"
    spinner = IdleSpinner(spin_cpus, idle=not busy) if (cfg.spinner or busy) and spin_cpus else None
    try:
        if spinner:
            say("%s loop on CPU %s" % (spinner.policy, ",".join(map(str, spin_cpus))))
            spinner.start()
        tf.buffer_size_kb = cfg.buffer_kb
        cpus = tf.cpus()
        for w in cfg.workloads:
            for rep in range(cfg.reps):
                k = rep % len(active)
                for c in active[k:] + active[:k]:
                    say("%s rep %d/%d: %s" % (w, rep + 1, cfg.reps, c.name))
                    if spinner and not spinner.running():
                        raise VmtraceError("the idle spinner died; the runs would not be comparable")
                    runs[w][c.name].append(run_once(c, tf, peer_bins[w], cfg, cpus, reader_cpus, peer_bins,
                                                    scratch, spinner))
    finally:
        if spinner:
            spinner.stop()
        tf.remove()
        shutil.rmtree(scratch, ignore_errors=True)

    return {
        **result_header("host", t0, load_start),
        "params": {
            "seconds": cfg.seconds, "reps": cfg.reps, "quick": cfg.quick, "events": list(cfg.events),
            "buffer_size_kb": cfg.buffer_kb, "workload_cpu": cfg.workload_cpu, "reader_cpus": reader_cpus,
            "cpus": cpus, "collectors": [c.name for c in active],
            "scenario": {"name": cfg.scenario, "what": SCENARIOS[cfg.scenario]},
            "idle_spinner": spinner.describe() if spinner else {
                "enabled": False, "cpus": [], "why": "turned off (--no-spinner)" if not cfg.spinner
                else "no CPU besides the workload's"},
        },
        "collectors": {c.name: c.description for c in chosen},
        "skipped": skipped,
        "workloads": {
            w: {"unit": WORKLOADS[w], "collectors": summarize_workload(runs[w])} for w in cfg.workloads
        },
    }
