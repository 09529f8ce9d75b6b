"""The seed's overhead evaluation, repeated on this machine's tracefs.

Method (seeds/002): trace sched, timer and kmem; run a workload pinned to one CPU;
overhead = (1 - score with a collector / score with ftrace only) x 100. We run every
collector once per repetition, rotating their order from one repetition to the next so
that slow drift of a shared machine does not always hit the same collector, and compare
each collector with the native run of the same repetition.

All tracing happens in a private tracefs instance with a fixed 4096 KB per-CPU buffer,
cleared before each run; the instance is removed at the end even on Ctrl-C.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from vmtrace.bench import collectors as coll
from vmtrace.bench import peers, stats
from vmtrace.errors import VmtraceError
from vmtrace.tracefs import CpuStats, Tracefs

EVENTS = ("sched", "timer", "kmem")
BUFFER_KB = 4096
WORKLOADS = {"intloop": "iterations/s", "pingpong": "round trips/s"}


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

    @classmethod
    def quick_config(cls) -> "Config":
        """Under 60 s: the event-heavy workload only, 2 s runs, 2 repetitions."""
        return cls(seconds=2.0, reps=2, workloads=("pingpong",), quick=True)


Progress = Callable[[str], None]


def run_workload(exe: Path, seconds: float, cpu: int) -> float:
    """Run a reference workload pinned to ``cpu`` and return the score it prints."""
    try:
        proc = subprocess.run(
            [str(exe), "%g" % seconds], capture_output=True, text=True, timeout=seconds + 60,
            preexec_fn=lambda: os.sched_setaffinity(0, {cpu}),
        )
    except subprocess.TimeoutExpired:
        raise VmtraceError("workload %s did not finish within %g s" % (exe.name, seconds + 60))
    try:
        score = float(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        score = float("nan")
    if proc.returncode != 0 or not score > 0:
        raise VmtraceError("workload %s failed (exit %d): %r" % (exe.name, proc.returncode, proc.stdout[-200:]))
    return score


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
             cpus: List[int], reader_cpus: List[int], peer_bins: Dict[str, Path], scratch: Path) -> dict:
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
        score = run_workload(workload, cfg.seconds, cfg.workload_cpu)
        tf.tracing_on = False
        after = _stats(tf, cpus)
    finally:
        tf.tracing_on = False
        if started:
            report = collector.stop()
        shutil.rmtree(outdir, ignore_errors=True)
    return {
        "score": score,
        "cpu_seconds": report.cpu_seconds,
        "bytes": report.bytes,
        "lost": ring_lost(before, after) if collector.tracing else 0,
        "lost_reported": report.lost_reported,
        "unread": sum(s.entries for s in after.values()) if collector.tracing else 0,
        "note": report.note,
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
            "runs": rs,
        }
    return out


def run(cfg: Config, progress: Optional[Progress] = None) -> dict:
    """Run the whole benchmark on the host's tracefs and return the result document."""
    say = progress or (lambda _msg: None)
    if cfg.reps < 1 or cfg.seconds <= 0:
        raise VmtraceError("--reps must be >= 1 and --seconds > 0")
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
    try:
        tf.buffer_size_kb = cfg.buffer_kb
        cpus = tf.cpus()
        for w in cfg.workloads:
            for rep in range(cfg.reps):
                k = rep % len(active)
                for c in active[k:] + active[:k]:
                    say("%s rep %d/%d: %s" % (w, rep + 1, cfg.reps, c.name))
                    runs[w][c.name].append(run_once(c, tf, peer_bins[w], cfg, cpus, reader_cpus, peer_bins, scratch))
    finally:
        tf.remove()
        shutil.rmtree(scratch, ignore_errors=True)

    return {
        "benchmark": "overhead",
        "schema": 1,
        "setting": "host",
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(t0)),
        "duration_s": round(time.time() - t0, 1),
        # other tenants of the machine are the main noise source: keep the evidence
        "loadavg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in os.getloadavg()]},
        "params": {
            "seconds": cfg.seconds, "reps": cfg.reps, "quick": cfg.quick, "events": list(cfg.events),
            "buffer_size_kb": cfg.buffer_kb, "workload_cpu": cfg.workload_cpu, "reader_cpus": reader_cpus,
            "cpus": cpus, "collectors": [c.name for c in active],
        },
        "collectors": {c.name: c.description for c in chosen},
        "skipped": skipped,
        "workloads": {
            w: {"unit": WORKLOADS[w], "collectors": summarize_workload(runs[w])} for w in cfg.workloads
        },
    }
