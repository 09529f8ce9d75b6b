"""Real multi-guest sessions of this machine, standing for several hosts of a fleet.

Each "guest" is a tracefs instance of its own with its own trace clock (``tai``,
``boot``, ``mono``), the "host" an instance on ``mono``; all trace the same workload
(this process and its children only, so other people's tracing on this machine does
not flood them), time probes follow the protocol (host CLOCK_MONOTONIC around a
``vmtrace-probe seq=N`` marker in the guest's instance), and every instance is
extracted with trace-cmd: every timestamp is a real kernel trace timestamp.

A ``lossy`` guest is made to drop events for certain: its ring buffer is small (64 KB
per CPU) and, pinned to one CPU, we write far more than that to its trace_marker
before anything else happens. The kernel overwrites the oldest pages and the reader's
first page then carries the missed-events count, which the decoder reports as a
lost-events record.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Dict, Optional

import realtrace

CLOCK_IDS = {"tai": time.CLOCK_TAI, "boot": time.CLOCK_BOOTTIME, "mono": time.CLOCK_MONOTONIC}
EVENTS = ["sched:sched_switch", "sched:sched_wakeup", "sched:sched_wakeup_new", "sched:sched_waking",
          "sched:sched_process_exec"]
WORKLOAD = "for i in $(seq 40); do ls / >/dev/null; echo $i | cat >/dev/null; sleep 0.002; done"
FLOOD_BYTES = 1 << 20          # 16x the lossy guest's 64 KB per-CPU buffer


def _marker(tf, text: str) -> None:
    fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def make_fleet_session(out: Path, guests: Dict[str, str], *, lossy: Optional[str] = None,
                       n_probes: int = 16, meta_extra: Optional[dict] = None) -> Path:
    """A session directory at ``out`` with ``host.dat`` and one ``NAME.dat`` per guest
    (``guests``: name -> trace clock)."""
    out.mkdir(parents=True, exist_ok=True)
    tag = "vmtrace-test-fl%d-%d" % (os.getpid(), time.monotonic_ns() % 10_000_000)
    inst = {}
    try:
        for name in ["host", *guests]:
            inst[name] = realtrace._fresh_instance("%s-%s" % (tag, name))
        for name, tf in inst.items():
            clock = "mono" if name == "host" else guests[name]
            tf.tracing_on = False
            tf.buffer_size_kb = 64 if name == lossy else 4096
            tf.clock = clock
            tf.enable_events(EVENTS)
            tf.write("set_event_pid", str(os.getpid()))
            tf.write("options/event-fork", "1")
            tf.clear()
        if lossy:
            g = inst[lossy]
            cpus = os.sched_getaffinity(0)
            os.sched_setaffinity(0, {min(cpus)})
            try:
                g.tracing_on = True
                line = "vmtrace-test flood " + "x" * 100 + "\n"
                for _ in range(FLOOD_BYTES // len(line)):
                    _marker(g, line)
            finally:
                os.sched_setaffinity(0, cpus)
        mono = time.CLOCK_MONOTONIC
        probes: Dict[str, list] = {g: [] for g in guests}
        orders: Dict[str, list] = {g: [] for g in guests}
        inst["host"].tracing_on = True
        wl = subprocess.Popen(["sh", "-c", WORKLOAD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for g in guests:
            s = time.clock_gettime_ns(mono)
            inst[g].tracing_on = True
            _marker(inst[g], "vmtrace-order kind=start")
            orders[g].append(["start", s, time.clock_gettime_ns(mono)])
        for seq in range(1, n_probes + 1):
            for g, clock in guests.items():
                s = time.clock_gettime_ns(mono)
                gv = time.clock_gettime_ns(CLOCK_IDS[clock])
                _marker(inst[g], "vmtrace-probe seq=%d" % seq)
                probes[g].append([s, gv, time.clock_gettime_ns(mono), seq])
            time.sleep(0.004)
        wl.wait(timeout=60)
        for g in guests:
            s = time.clock_gettime_ns(mono)
            _marker(inst[g], "vmtrace-order kind=stop")
            inst[g].tracing_on = False
            orders[g].append(["stop", s, time.clock_gettime_ns(mono)])
        inst["host"].tracing_on = False
        for name, tf in inst.items():
            subprocess.run(["trace-cmd", "extract", "-B", tf.instance, "-o", str(out / (name + ".dat"))],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    finally:
        for tf in inst.values():
            realtrace._remove(tf)
    meta = {"layout": "vmtrace-session", "version": 1,
            "guests": {g: {"file": g + ".dat", "clock": clock, "cpus": os.cpu_count(), "stats": {},
                           "probes": probes[g], "orders": orders[g]} for g, clock in guests.items()},
            "host": {"file": "host.dat", "clock": "mono"}}
    meta.update(meta_extra or {})
    (out / "session.json").write_text(json.dumps(meta, indent=1))
    return out


# Three sessions of two hosts: hv1 twice (guests g1, g2), hv2 once (g1 and a lossy g3).
# g1 exists on both hosts: the same guest name on two hosts is two partitions.
FLEET = (
    ("hv1-a", "hv1", {"g1": "tai", "g2": "boot"}, None),
    ("hv1-b", "hv1", {"g1": "tai", "g2": "mono"}, None),
    ("hv2-a", "hv2", {"g1": "boot", "g3": "mono"}, "g3"),
)

_built: Dict[str, Dict[str, Path]] = {}


def fleet(base: Path) -> Dict[str, Path]:
    """The FLEET sessions under ``base`` (built once per test process): name -> dir.
    Each session.json names its host (``hostname``)."""
    key = str(base)
    if key not in _built:
        _built[key] = {name: make_fleet_session(base / name, guests, lossy=lossy,
                                                meta_extra={"hostname": host})
                       for name, host, guests, lossy in FLEET}
    return _built[key]


DOC = Path(__file__).resolve().parent.parent.parent / "docs" / "timeline.md"


def doc_queries() -> Dict[str, str]:
    """The fleet queries of docs/timeline.md (```sql dataset blocks), by their first
    comment line: the tests run them as they are printed there."""
    out = {}
    for q in re.findall(r"```sql dataset\n(.*?)```", DOC.read_text(), re.S):
        out[q.splitlines()[0].lstrip("- ").strip()] = q
    return out
