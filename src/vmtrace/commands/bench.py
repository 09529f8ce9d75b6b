"""`vmtrace bench`: overhead, decode and drain benchmarks against reference peers.

Thin: the measuring lives in ``vmtrace.bench``; this module parses options, shows
progress on stderr, and writes the table, the JSON and the PNG.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import click

from vmtrace.errors import VmtraceError


def _console():
    from rich.console import Console

    return Console(stderr=True, highlight=False)


def _stdout_console():
    """Tables are wide; when stdout is a file or pipe, do not squeeze them into 80 columns."""
    from rich.console import Console

    return Console() if sys.stdout.isatty() else Console(width=200)


def _say():
    con = _console()
    return lambda msg: con.print("[dim]%s[/dim]" % msg)


def _out_option(f):
    return click.option("--out", "out", type=click.Path(file_okay=False, path_type=Path), default=None,
                        help="Directory for the JSON and PNG (default: bench/results/).")(f)


@click.group("bench")
def command() -> None:
    """Overhead, decode and drain benchmarks against reference peers."""


@command.command("overhead")
@click.option("--seconds", type=float, default=None, help="Length of each workload run (default 5; quick 2).")
@click.option("--reps", type=int, default=None, help="Repetitions; collectors alternate within each (default 3; quick 2).")
@click.option("--quick", is_flag=True, help="Under 60 s: pingpong only, 2 s runs x 2 repetitions.")
@click.option("--guest", is_flag=True, help="Measure inside the TCG guest through real virtio-serial ports.")
@click.option("--workload", "workloads", multiple=True, type=click.Choice(["intloop", "pingpong"]),
              help="Workload(s) to run (default: both; quick: pingpong).")
@click.option("--collector", "collectors", multiple=True,
              type=click.Choice(["off", "native", "vmtrace", "seedlike", "copy", "text"]),
              help="Collector(s) to compare (default: all; native is always included).")
@click.option("--spinner/--no-spinner", "spinner", default=True, show_default=True,
              help="Keep the non-workload CPUs busy with a SCHED_IDLE loop in every configuration, so that "
                   "idle-state effects do not favour collectors that run there (see docs/benchmarks.md).")
@click.option("--scenario", type=click.Choice(["batch", "moving", "busy"]), default="batch", show_default=True,
              help="What else runs: batch = a SCHED_IDLE loop on every other CPU; moving = as batch, and the "
                   "workload changes CPU every 0.25 s; busy = a normal-priority loop on every other CPU.")
@_out_option
def overhead_cmd(seconds: Optional[float], reps: Optional[int], quick: bool, guest: bool, workloads, collectors,
                 spinner: bool, scenario: str, out: Optional[Path]) -> None:
    """Slow-down a collector costs a pinned workload, against ftrace alone (the seed's method)."""
    from vmtrace.bench import overhead, results

    cfg = overhead.Config.quick_config() if quick else overhead.Config()
    if guest and quick:
        # TCG is ~30x slower than the host and a Python collector takes seconds to start:
        # keep the guest's quick run under about two minutes.
        cfg.seconds = 1.5
    if seconds is not None:
        cfg.seconds = seconds
    if reps is not None:
        cfg.reps = reps
    cfg.spinner = spinner
    cfg.scenario = scenario
    if guest and scenario != "batch":
        raise VmtraceError("--scenario %s: only the batch scenario runs in the guest so far" % scenario)
    if workloads:
        cfg.workloads = tuple(workloads)
    if collectors:
        names = list(collectors)
        if "native" not in names:
            names.insert(0, "native")
        cfg.collectors = tuple(n for n in ("off", "native", "vmtrace", "seedlike", "copy", "text") if n in names)
    con = _console()
    if guest:
        from vmtrace.bench import guest as guest_bench

        doc = guest_bench.run(cfg, progress=_say())
    else:
        doc = overhead.run(cfg, progress=_say())
    results.attach_context(doc)
    out_dir = out or results.DEFAULT_DIR
    js = results.write_json(doc, out_dir, "overhead")
    png = results.overhead_png(doc, out_dir / "overhead.png")
    _stdout_console().print(results.overhead_table(doc))
    for name, why in doc.get("skipped", {}).items():
        con.print("skipped %s: %s" % (name, why))
    con.print("wrote %s and %s (%.0f s)" % (js, png, doc["duration_s"]))


def _call_run(module: str, what: str, **kwargs: Any) -> Dict[str, Any]:
    """Call ``module.run`` with the options it accepts; say clearly if it has not landed."""
    if importlib.util.find_spec(module) is None:
        raise VmtraceError("bench %s: %s is not available yet" % (what, module))
    mod = importlib.import_module(module)
    run = getattr(mod, "run", None)
    if run is None:
        raise VmtraceError("bench %s: %s has no run() function yet" % (what, module))
    params = inspect.signature(run).parameters
    accepts_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    args = {k: v for k, v in kwargs.items() if v is not None and (accepts_any or k in params)}
    doc = run(**args)
    if not isinstance(doc, dict):
        raise VmtraceError("bench %s: %s.run returned %s, not a result dict" % (what, module, type(doc).__name__))
    return doc


def _emit(doc: Dict[str, Any], what: str, out: Optional[Path]) -> None:
    from vmtrace.bench import results

    doc.setdefault("benchmark", what)
    results.attach_context(doc)
    out_dir = out or results.DEFAULT_DIR
    js = results.write_json(doc, out_dir, what)
    png = results.generic_png(doc, out_dir / (what + ".png"), "vmtrace bench " + what)
    _stdout_console().print(results.generic_table(doc, "vmtrace bench " + what))
    _console().print("wrote %s%s" % (js, (" and %s" % png) if png else ""))


@command.command("decode")
@click.argument("trace", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--reps", type=int, default=3, show_default=True)
@_out_option
def decode_cmd(trace: Path, reps: int, out: Optional[Path]) -> None:
    """Decode speed of TRACE against `trace-cmd report` (text, and columnar decode)."""
    if not trace.is_file():
        raise VmtraceError("bench decode: %s: no such file" % trace)
    if reps < 1:
        raise VmtraceError("--reps must be >= 1")
    _emit(_call_run("vmtrace.bench.decode", "decode", trace_path=trace, reps=reps, progress=_say()), "decode", out)


@command.command("drain")
@click.option("--seconds", type=float, default=None, help="Length of each run.")
@click.option("--reps", type=int, default=None, help="Repetitions.")
@click.option("--quick", is_flag=True, help="A short run.")
@click.option("--guests", type=click.IntRange(1, 64), default=None, help="Guests (producer processes), default 8.")
@click.option("--streams", type=click.IntRange(1, 64), default=None, help="Streams (vCPUs) per guest, default 8.")
@click.option("--rate", "rate_mb_s", type=float, default=None, help="Aggregate offered MB/s, default 1100.")
@_out_option
def drain_cmd(seconds: Optional[float], reps: Optional[int], quick: bool, guests: Optional[int],
              streams: Optional[int], rate_mb_s: Optional[float], out: Optional[Path]) -> None:
    """Host drain loop against one `cat` per FIFO."""
    _emit(_call_run("vmtrace.bench.drain", "drain", seconds=seconds, reps=reps, quick=quick or None,
                    guests=guests, streams=streams, rate_mb_s=rate_mb_s, progress=_say()), "drain", out)


@command.command("sync")
@click.option("--runs", type=int, default=3, show_default=True, help="Sessions per load level.")
@click.option("--seconds", type=float, default=3.0, show_default=True, help="Workload length of each session.")
@click.option("--load", "loads", multiple=True, type=click.IntRange(0, 16),
              help="Busy loops on the host during a session (repeatable; default 0 and 2).")
@click.option("--clock", default=None, help="Guest trace clock (default: the recorder's choice, x86-tsc).")
@_out_option
def sync_cmd(runs: int, seconds: float, loads: tuple, clock: Optional[str], out: Optional[Path]) -> None:
    """Clock sync of the TCG lab guest, session after session: bound and hold-out per run."""
    from vmtrace.bench import results, sync

    doc = sync.run(runs=runs, seconds=seconds, loads=tuple(loads) or (0, 2), clock=clock, progress=_say())
    results.attach_context(doc)
    out_dir = out or results.DEFAULT_DIR
    js = results.write_json(doc, out_dir, "sync")
    png = sync.plot(doc, out_dir / "sync.png")
    _stdout_console().print(sync.table(doc))
    for k, v in doc["summary"].items():
        _stdout_console().print("%s: %s" % (k, v))
    _console().print("wrote %s%s" % (js, (" and %s" % png) if png else ""))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(command())
