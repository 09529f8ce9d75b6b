"""`vmtrace bench sync`: how well a TCG guest is put on the host's clock, run after run.

Each run is a demo-like session: the lab guest (2 vCPUs, QMP and named threads, as the
demo wires it) runs pingpong and intloop while `record` records it with host events,
so the recorder picks ``x86-tsc`` and the tcg method (docs/timeline.md). Conditions:
an unloaded host, and a host with two busy loops (one per CPU, ``--load 2``). Per run:
the method, the bound (``vmtrace check``'s sync error bound), the hold-out result (a fit
on every other guest event, the others checked; violations and how far the held-out
offset lies from the full fit's), the segments, and the probe fit's bound on the same
session for comparison. With ``--clock`` another guest clock can be asked for, which
the tcg method does not serve: the probe fit is then what is measured.
"""
from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

from vmtrace.errors import VmtraceError

GUEST = "demo"


def _busy(n: int) -> List[subprocess.Popen]:
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def one_run(image: Any, seconds: float, load: int, clock: Optional[str], workdir: Path) -> Dict[str, Any]:
    """One session; returns its figures."""
    from vmtrace.clocksync import causality, ptp
    from vmtrace.host.recording import record
    from vmtrace.lab.demo import AgentGuest, guest_script, workload_command
    from vmtrace.session import Session

    script = guest_script(workload_command(seconds, 2))
    out = workdir / "session"
    busy: List[subprocess.Popen] = []
    try:
        with AgentGuest(image, script, workdir / "vm", smp=2, accel="tcg", name=GUEST) as ag:
            busy = _busy(load)
            record([ag.layout.path], outdir=str(out), duration=seconds + 1.0, events=["sched", "irq"],
                   host_events=["sched:sched_switch", "sched:sched_wakeup"], clock=clock, hello_timeout=10.0)
            ag.guest.wait_exit(90)
    finally:
        for p in busy:
            p.send_signal(signal.SIGKILL)
            p.wait()
    s = Session(str(out))
    s.clock_map(GUEST)
    rep = s.reports[GUEST]
    main = causality.check_guest(s, GUEST)
    held = causality.check_guest(s, GUEST, holdout=True)
    row: Dict[str, Any] = {"method": rep.method, "clock": s.source(GUEST).clock, "load": load,
                           "bound_us": rep.max_error_ns / 1e3, "violations": len(main.violations),
                           "holdout_violations": len(held.violations), "segments": rep.segments,
                           "holdout_events": held.events_checked, "holdout_probes": held.probes_checked}
    if rep.method == "tcg":
        ev = s._tcg_evidence[GUEST]
        full = s.clock_map(GUEST)
        hmap = None
        try:
            from vmtrace.clocksync import tcg
            hmap = tcg.holdout(ev)[0]
        except VmtraceError:
            pass
        if hmap is not None:
            import numpy as np
            g = ev.g[1::2]
            row["holdout_error_us"] = float(np.max(np.abs(full.to_host(g) - hmap.to_host(g)))) / 1e3
        row["band_us"] = max(sg["band_ns"] for sg in rep.evidence["segments"]) / 1e3
        row["anchor_bound_us"] = rep.evidence["anchor_bound_ns"] / 1e3
    try:
        _m, prep = ptp.fit(s.fit_probes(GUEST))
        row["probe_fit_bound_us"] = prep.max_error_ns / 1e3
    except VmtraceError:
        pass
    return row


def run(runs: int = 3, seconds: float = 3.0, loads: tuple = (0, 2), clock: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """``runs`` sessions per load level, alternating the levels."""
    from vmtrace.lab.image import build_image

    if not 1 <= runs <= 50:
        raise VmtraceError("--runs must be between 1 and 50")
    say = progress or (lambda m: None)
    image = build_image()
    t0 = time.monotonic()
    rows: List[Dict[str, Any]] = []
    for i in range(runs):
        for load in loads:
            with tempfile.TemporaryDirectory(prefix="vmtrace-bench-sync-") as tmp:
                say("run %d/%d, %d busy loop(s)" % (i + 1, runs, load))
                try:
                    row = one_run(image, seconds, load, clock, Path(tmp))
                except VmtraceError as exc:
                    row = {"load": load, "error": str(exc)[:300]}
                row["run"] = i + 1
                rows.append(row)
    return {"benchmark": "sync", "params": {"runs": runs, "seconds": seconds, "loads": list(loads),
                                            "clock": clock or "auto (x86-tsc)"},
            "runs": rows, "summary": summary(rows), "duration_s": time.monotonic() - t0}


def summary(rows: List[Dict[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for load in sorted({r["load"] for r in rows}):
        rs = [r for r in rows if r["load"] == load and "bound_us" in r]
        if not rs:
            continue
        b = sorted(r["bound_us"] for r in rs)
        out["load %d" % load] = {"runs": len(rs), "methods": sorted({r["method"] for r in rs}),
                                 "bound_us_median": statistics.median(b), "bound_us_max": b[-1],
                                 "runs_with_violations": sum(1 for r in rs if r["violations"] or r["holdout_violations"]),
                                 "failed_runs": sum(1 for r in rows if r["load"] == load and "error" in r)}
    return out


def table(doc: Dict[str, Any]):
    from rich.table import Table

    t = Table(title="vmtrace bench sync (%s)" % doc["params"]["clock"])
    cols = ["run", "load", "method", "bound_us", "band_us", "anchor_bound_us", "holdout_error_us",
            "violations", "holdout_violations", "holdout_events", "segments", "probe_fit_bound_us"]
    for c in cols:
        t.add_column(c, justify="right")
    for r in doc["runs"]:
        if "error" in r:
            t.add_row(str(r["run"]), str(r["load"]), "error: " + r["error"][:60], *[""] * (len(cols) - 3))
            continue
        t.add_row(*[("%.2f" % r[c]) if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols])
    return t


def plot(doc: Dict[str, Any], path: Path) -> Optional[Path]:
    rows = [r for r in doc["runs"] if "bound_us" in r]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for load, mk in zip(sorted({r["load"] for r in rows}), "os^d"):
        rs = [r for r in rows if r["load"] == load]
        ax.plot([r["run"] for r in rs], [r["bound_us"] for r in rs], mk + "-", label="bound, %d busy loops" % load)
        he = [(r["run"], r["holdout_error_us"]) for r in rs if "holdout_error_us" in r]
        if he:
            ax.plot([x for x, _ in he], [y for _, y in he], mk + ":", label="hold-out error, %d busy loops" % load)
    ax.set_yscale("symlog", linthresh=0.1)      # a hold-out error of 0 stays visible
    ax.set_xticks(sorted({r["run"] for r in rows}))
    ax.set_xlabel("run")
    ax.set_ylabel("us")
    ax.set_title("guest on the host's clock: bound and hold-out error per run")
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
