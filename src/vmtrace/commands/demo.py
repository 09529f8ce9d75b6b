"""`vmtrace demo`: boot a real guest, trace it, and show what came out.

Thin on purpose: the steps live in :mod:`vmtrace.lab.demo`; this module shows progress while
they run and draws the result (tables, the first report lines, where the files are and
the commands that open them).
"""
from __future__ import annotations

import os
import shlex
import signal
import subprocess
import sys
import threading
from typing import Any, Optional

import click

from vmtrace.errors import VmtraceError


class _RichUi:
    """Progress on stderr: a live status line on a terminal, plain lines otherwise."""

    def __init__(self, console: Any) -> None:
        self.console = console
        self.live = console.is_terminal
        self.status: Optional[Any] = None
        self.text = ""

    def __enter__(self) -> "_RichUi":
        if self.live:
            self.status = self.console.status("starting", spinner="dots")
            self.status.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.status is not None:
            self.status.__exit__(*exc)

    def phase(self, text: str) -> None:
        """Announce a step; an empty text only closes the previous one."""
        if self.text and self.live:
            self.console.print("[green]done[/green] %s" % self.text)
        self.text = text
        if not text:
            return
        if self.status is not None:
            self.status.update(text)
        else:
            self.console.print("demo: %s" % text)

    def recording(self, elapsed: float, total: float, nbytes: int, pages: int) -> None:
        line = "recording %4.1f / %.1f s   %6.2f MB   %d pages" % (min(elapsed, total), total, nbytes / 1e6, pages)
        if self.status is not None:
            self.status.update(line)

    def guest_line(self, line: str) -> None:
        if line.startswith("VMTRACE-DEMO SCORE") or line.startswith("agent: "):
            return
        if line.startswith("VMTRACE-DEMO"):
            return
        if line.strip():
            self.console.print("[dim]guest: %s[/dim]" % line)


def _mb(n: float) -> str:
    return "%.2f MB" % (n / 1e6)


def _show(out: Any, res: Any) -> None:
    from rich.table import Table

    st = res.stats
    ev = Table(title="events per type (guest %s)" % "demo", title_justify="left")
    ev.add_column("event")
    ev.add_column("count", justify="right")
    for name, n in list(st["per_event"].items())[:14]:
        ev.add_row(name, "{:,}".format(n))
    rest = list(st["per_event"].items())[14:]
    if rest:
        ev.add_row("(%d more types)" % len(rest), "{:,}".format(sum(n for _, n in rest)))
    ev.add_row("[bold]all[/bold]", "[bold]{:,}[/bold]".format(st["events"]))

    agent = res.session["guests"]["demo"]["stats"].get("agent") or {}
    # the stop/bye replies carry the per-CPU mapping itself, a stats reply nests it in "cpus"
    agent_cpus = agent.get("cpus", agent) if isinstance(agent, dict) else {}
    host = res.session["guests"]["demo"]["stats"].get("host", {})
    cpu = Table(title="per vCPU", title_justify="left")
    for col in ("vCPU", "events", "pages", "bytes", "lost (in trace)", "lost (agent)"):
        cpu.add_column(col, justify="right")
    for c, s in sorted(st["cpus"].items()):
        h = host.get(str(c), {})
        a = agent_cpus.get(str(c), {}) if isinstance(agent_cpus, dict) else {}
        lost = str(s["lost"]) + (" +%d unknown" % s["lost_unknown"] if s["lost_unknown"] else "")
        cpu.add_row(str(c), "{:,}".format(s["events"]), str(s["pages"]), _mb(h.get("written", 0)),
                    lost, str(a.get("lost_events", "?")))
    cpu.add_row("all", "{:,}".format(st["events"]), str(res.pages), _mb(res.bytes),
                str(st["lost"]), str(res.agent_lost))
    out.print(ev)
    out.print(cpu)
    sc = "  ".join("%s %s/s" % (k, "{:,.0f}".format(v)) for k, v in res.scores.items())
    out.print("guest: %s vCPUs, kernel %s, %s; workload scores: %s"
              % (res.ready.get("cpus", "?"), res.ready.get("kernel", "?"), res.accel.upper(), sc or "none printed"))
    out.print("[bold]first %d lines of the report[/bold] (vmtrace's renderer, as trace-cmd report prints them):"
              % len(res.report))
    for line in res.report:
        out.print(line, markup=False, highlight=False, soft_wrap=True)

    q = shlex.quote
    rel = os.path.relpath(res.outdir)
    rel = rel if not rel.startswith("..") else res.outdir
    dat = os.path.join(rel, os.path.basename(res.dat))
    files = Table(title="files in %s" % res.outdir, title_justify="left", show_header=False)
    files.add_column("what")
    files.add_column("path")
    files.add_row("guest trace.dat", res.dat)
    if res.host_dat:
        files.add_row("host trace.dat", res.host_dat)
    files.add_row("session", os.path.join(res.outdir, "session.json"))
    if res.png:
        files.add_row("timeline PNG", res.png)
    if res.html:
        files.add_row("timeline HTML", res.html)
    if res.sync:
        files.add_row("clock sync", res.sync)
    out.print(files)
    out.print("open them with:")
    out.print("  trace-cmd report -i %s | less" % q(dat), markup=False)
    if res.host_dat:
        host = os.path.join(rel, os.path.basename(res.host_dat))
        out.print("  trace-cmd report -i %s | less" % q(host), markup=False)
        out.print("  kernelshark -i %s -a %s" % (q(dat), q(host)), markup=False)
    else:
        out.print("  kernelshark -i %s" % q(dat), markup=False)
    out.print("  vmtrace report %s --stats" % q(dat), markup=False)
    if res.html:
        out.print("  xdg-open %s" % q(os.path.join(rel, os.path.basename(res.html))), markup=False)
    for p in res.problems:
        out.print("[yellow]note:[/yellow] %s" % p)


def _session_views(out: Any, outdir: str) -> None:
    """With --host-events: the merged session, through the commands a user would type."""
    exe = os.path.join(os.path.dirname(sys.executable), "vmtrace")
    argv0 = [exe] if os.access(exe, os.X_OK) else [sys.executable, "-m", "vmtrace.cli"]
    for args, keep in ((["report", outdir], 12), (["check", outdir], 20)):
        shown = "vmtrace " + " ".join(shlex.quote(a) for a in args)
        try:
            res = subprocess.run(argv0 + args, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            out.print("%s: took more than 120 s; skipped" % shown, markup=False)
            continue
        if res.returncode != 0:
            err = (res.stderr.strip().splitlines() or ["exit %d" % res.returncode])[-1]
            out.print("%s: not available for a session here (%s)" % (shown, err[:200]), markup=False,
                      soft_wrap=True)
            continue
        lines = res.stdout.splitlines()
        out.print("$ %s   (first %d of %d lines)" % (shown, min(keep, len(lines)), len(lines)), markup=False)
        for line in lines[:keep]:
            out.print("  " + line, markup=False, highlight=False, soft_wrap=True)


@click.command("demo")
@click.option("--seconds", type=float, default=5.0, show_default=True, help="How long to record the workload.")
@click.option("-o", "--output", "outdir", default="vmtrace-demo", show_default=True,
              help="Where trace.dat, session.json and the timeline go (a previous demo there is replaced).")
@click.option("--host-events", default=None,
              help="Also record these host events (e.g. sched,kvm) into host.dat and show the merged session.")
@click.option("--smp", type=int, default=2, show_default=True, help="vCPUs of the guest.")
@click.option("--accel", type=click.Choice(["auto", "kvm", "tcg"]), default="auto", show_default=True,
              help="auto probes KVM once per host boot and falls back to TCG.")
def command(seconds: float, outdir: str, host_events: Optional[str], smp: int, accel: str) -> None:
    """Boot a real guest, record its ftrace events through the agent, and show the result."""
    from rich.console import Console

    from vmtrace.lab.demo import DemoOptions, run_demo

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 120)
    err = Console(stderr=True, highlight=False)
    hosts = [e.strip() for e in host_events.split(",") if e.strip()] if host_events else None
    if host_events is not None and not hosts:
        raise VmtraceError("--host-events needs a list such as sched,kvm")
    opts = DemoOptions(seconds=seconds, outdir=outdir, host_events=hosts, smp=smp, accel=accel)
    stop = threading.Event()
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum: int, frame: Any) -> None:
        # First Ctrl-C: stop recording and still write the files; second: abort.
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    try:
        with _RichUi(err) as ui:
            res = run_demo(opts, ui, stop)
            ui.phase("")
    finally:
        signal.signal(signal.SIGINT, previous)
    _show(out, res)
    if res.host_dat:
        _session_views(out, res.outdir)
    t = res.timings
    out.print("took %.1f s: build %.1f, boot %.1f, record+write %.1f, guest off %.1f, decode %.1f, timeline %.1f"
              % (t["total"], t["build"] + t.get("accel probe", 0), t["boot"], t["record+write"],
                 t["shutdown"], t["decode"], t["timeline"]))
