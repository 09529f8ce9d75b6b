"""`vmtrace report INPUT`: print a trace like `trace-cmd report`, or export it.

Thin: the input is opened as a Source (:mod:`vmtrace.source`: a trace.dat, a raw
directory, an ``-o`` stream or a whole session), the options become one Selection, and
the chosen export (:mod:`vmtrace.export`, whose registry lists the ``--format``
choices) writes it. A session takes every option a single trace takes.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import click

from vmtrace.errors import VmtraceError
from vmtrace.export import registry


def _cpu_list(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    from vmtrace.tracefs import parse_cpu_list
    try:
        return tuple(parse_cpu_list(text))
    except (ValueError, VmtraceError):
        raise VmtraceError(f"--cpu: not a CPU list: {text!r} (example: 0,2-3)") from None


def _names(text: Optional[str]) -> Optional[tuple]:
    if not text:
        return None
    return tuple(e.strip() for e in text.split(",") if e.strip())


def _seconds(text: Optional[str], opt: str) -> Optional[int]:
    if text is None:
        return None
    try:
        return int(round(float(text) * 1e9))
    except ValueError:
        raise VmtraceError(f"{opt}: not a number of seconds: {text!r}") from None


def _stats(source: Any, selection: Any, out) -> None:
    from rich.console import Console
    from rich.table import Table
    con = Console(file=out, width=100)
    st = source.stats(**selection.kwargs())
    members = st["sources"].items() if "sources" in st else [(None, st)]
    for label, s in members:
        title = f"{source.name}: " + (f"{label}, per CPU" if label else "per CPU")
        t = Table(title=title)
        for col in ("cpu", "events", "pages", "lost", "lost (unknown count)", "skipped pages"):
            t.add_column(col, justify="right")
        for cpu, c in sorted(s["cpus"].items()):
            t.add_row(str(cpu), str(c["events"]), str(c["pages"]), str(c["lost"]),
                      str(c["lost_unknown"]), str(c["problems"]))
        t.add_row("all", str(s["events"]), "", str(s["lost"]), str(s["lost_unknown"]), "")
        con.print(t)
        e = Table(title="per event" if not label else f"{label}: per event")
        e.add_column("event")
        e.add_column("count", justify="right")
        for name, n in s["per_event"].items():
            e.add_row(name, str(n))
        con.print(e)


def _write(out: Optional[str], what: Any) -> Any:
    """Run an export; a file it cannot open is a one-line error, not a traceback."""
    try:
        return what()
    except OSError as exc:
        raise VmtraceError(f"{exc.filename or out}: {exc.strerror or exc}") from None


@click.command("report")
@click.argument("file", type=click.Path(exists=False, dir_okay=True))
@click.option("--format", "fmt", type=click.Choice(list(registry())), default="text", show_default=True,
              help="; ".join(f"{n}: {m.FORMAT.help}" for n, m in registry().items()) + ".")
@click.option("-o", "--output", "out", type=click.Path(dir_okay=False), help="Write here instead of stdout.")
@click.option("--events", help="Comma-separated system or system:event (globs allowed).")
@click.option("--cpu", "cpu", help="CPUs to show, e.g. 0,2-3 (of every source of a session).")
@click.option("--source", "sources", help="Sources of a session to show, e.g. host,guest1.")
@click.option("--start", help="First timestamp to show, in seconds (as printed; a session's are on the host's clock).")
@click.option("--end", help="Last timestamp to show, in seconds (as printed).")
@click.option("--stats", is_flag=True, help="Per-CPU and per-event counts and lost events.")
@click.option("--keep-going", is_flag=True, help="Skip corrupt pages, count them, report the rest.")
@click.option("--formats", type=click.Path(file_okay=False), help="Guest tracefs copy (events/, header_page, header_event) for a raw directory without metadata.")
@click.option("--html", "html", type=click.Path(dir_okay=False), help="Also write a self-contained timeline page here.")
@click.option("--steal", is_flag=True, help="A session: per vCPU, the time its host thread waited for a CPU "
              "(steal), the longest wait and the host tasks that ran instead.")
def command(file: str, fmt: str, out: Optional[str], events: Optional[str], cpu: Optional[str],
            sources: Optional[str], start: Optional[str], end: Optional[str], stats: bool, keep_going: bool,
            formats: Optional[str], html: Optional[str], steal: bool = False) -> None:
    """Decode a trace.dat, raw directory, -o stream or session and print it like `trace-cmd report`.

    A session directory from `vmtrace record` prints host and guests interleaved on the
    host's clock, each line tagged with its source.
    """
    from vmtrace import source as vsource
    if steal:
        _steal(file, _names(sources))
        return
    export = registry()[fmt]
    if export.FORMAT.needs_file and not out:
        raise VmtraceError(f"--format {fmt} needs -o FILE")
    sel = vsource.Selection(events=_names(events), cpus=_cpu_list(cpu), sources=_names(sources),
                            start=_seconds(start, "--start"), end=_seconds(end, "--end"))
    with vsource.open(file, keep_going=keep_going, formats=formats) as src:
        src.check_selection(**sel.kwargs())
        if html:
            _write(html, lambda: registry()["html"].write(src, html, sel))
        if stats:
            if out:
                with open(out, "w", encoding="utf-8") as f:
                    _stats(src, sel, f)
            else:
                _stats(src, sel, sys.stdout)
        else:
            said = _write(out, lambda: export.write(src, out, sel))
            if said:
                print(f"vmtrace: {said}", file=sys.stderr)
        problems = [p for m in src.members() for p in getattr(m, "problems", [])]
        if keep_going and problems:
            cpu0, first = problems[0]
            print(f"vmtrace: warning: {file}: skipped {len(problems)} corrupt page(s) "
                  f"(first: cpu{cpu0} offset {first.offset}: {first.what})", file=sys.stderr)


def _steal(path: str, sources: Optional[list]) -> None:
    """`--steal`: the per-vCPU table (clocksync/steal.py)."""
    from vmtrace.clocksync import steal as st
    from vmtrace.session import Session, is_session_dir

    if not is_session_dir(path):
        raise VmtraceError("--steal needs a session directory (vmtrace record --host-events), not %s" % path)
    s = Session(path)
    t0 = s.meta.get("started_ns") if isinstance(s.meta.get("started_ns"), int) else 0
    t1 = s.meta.get("stopped_ns") if isinstance(s.meta.get("stopped_ns"), int) and s.meta["stopped_ns"] else 1 << 62
    names = [n for n in s.guests if not sources or n in sources]
    print("steal: per vCPU, its host thread's time between the first start order and the last stop "
          "acknowledgement (steal = runnable but not running)")
    print("%-10s %4s %8s %10s %10s %7s %12s %10s  %s" % ("guest", "vcpu", "thread", "running_s", "steal_s", "steal%",
                                                         "longest_ms", "at_s", "top host tasks (preempted time)"))
    for n in names:
        try:
            cpu2tid, by_tid = st.session_states(s, n, t0, t1)
        except VmtraceError as exc:
            print("%-10s %s" % (n, exc))
            continue
        shared = len(set(cpu2tid.values())) < len(cpu2tid)
        for cpu, tid in sorted(cpu2tid.items()):
            ts = by_tid[tid]
            run, stolen = ts.total("running"), ts.steal
            longest = ts.longest_steal
            top = ", ".join("%s %.1f ms" % (o, d / 1e6) for o, d in ts.top_others())
            print("%-10s %4s %8d %10.3f %10.3f %6.1f%% %12.3f %10s  %s" % (
                n, "all" if shared else cpu, tid, run / 1e9, stolen / 1e9,
                100.0 * stolen / (run + stolen) if run + stolen else 0.0,
                (longest.end - longest.start) / 1e6 if longest else 0.0,
                "%.6f" % ((longest.start - t0) / 1e9) if longest else "-", top or "-"))
            if shared:
                break
        if shared:
            print("%-10s (one host thread runs every vCPU, thread=single: steal is the guest's as a whole)" % "")
