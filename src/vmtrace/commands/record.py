"""`vmtrace record`: record guests (and optionally the host) into one session directory."""
from __future__ import annotations

import signal
import sys
import threading
from typing import Optional

import click

from vmtrace.errors import VmtraceError


def _size(text: Optional[str]) -> Optional[int]:
    if text is None:
        return None
    t = text.strip().upper().rstrip("B")
    mult = 1
    for suffix, m in (("K", 1 << 10), ("M", 1 << 20), ("G", 1 << 30), ("T", 1 << 40)):
        if t.endswith(suffix):
            mult, t = m, t[:-1]
            break
    if not t.isdigit() or int(t) <= 0:
        raise VmtraceError("bad size %r (use a number with K, M, G)" % text)
    return int(t) * mult


def _list(text: Optional[str]):
    return [e.strip() for e in text.split(",") if e.strip()] if text else None


@click.command("record")
@click.argument("guests", nargs=-1)
@click.option("-o", "--output", "outdir", default=None, help="Session directory (default ./vmtrace-DATE-TIME).")
@click.option("--duration", type=float, default=None, help="Stop after S seconds (default: Ctrl-C).")
@click.option("--events", default="sched,timer,irq", show_default=True, help="Guest events, comma separated.")
@click.option("--clock", default=None, help="Guest trace clock (default: the guest's).")
@click.option("--buffer-kb", type=int, default=None, help="Guest ring buffer size per CPU, KB.")
@click.option("--host-events", default=None, help="Also record these host events into host.dat (clock mono).")
@click.option("--formats", "formats_dir", default=None,
              help="For a seed-style agent: a copy of the guest's tracefs events/ and header files.")
@click.option("--file-version", type=click.Choice(["6", "7"]), default="7", show_default=True)
@click.option("--compression", type=click.Choice(["zstd", "zlib", "none"]), default="zstd", show_default=True)
@click.option("--max-size", default=None, help="Per-guest cap on trace bytes (e.g. 2G); pages beyond are dropped and counted.")
@click.option("--max-metadata", default="64M", show_default=True, help="Per-guest cap on metadata size.")
@click.option("--keep-raw", is_flag=True, help="Keep the raw spool directories next to the .dat files.")
@click.option("--dir", "base", default=None, help="Where prepared guests live (as given to vmtrace prepare).")
@click.option("--no-kallsyms", "kallsyms", is_flag=True, flag_value=False, default=True,
              help="Do not ask guests for /proc/kallsyms.")
@click.option("--connect-timeout", type=float, default=30.0, show_default=True,
              help="Seconds to wait for each guest's agent to connect and answer (a Python agent in a "
                   "TCG guest on a busy host can take many).")
@click.option("--quiet", is_flag=True, help="No live progress table.")
def command(guests, outdir, duration, events, clock, buffer_kb, host_events, formats_dir, file_version,
            compression, max_size, max_metadata, keep_raw, base, kallsyms, connect_timeout, quiet) -> None:
    """Record GUEST... (names prepared with `vmtrace prepare`, or their directories)."""
    from rich.console import Console
    from rich.live import Live

    from vmtrace.host.progress import Progress, summary_table
    from vmtrace.host.recording import Options, Recording

    if duration is not None and duration <= 0:
        raise VmtraceError("--duration must be positive")
    if connect_timeout <= 0:
        raise VmtraceError("--connect-timeout must be positive")
    opts = Options(outdir=outdir, duration=duration, events=_list(events), clock=clock, buffer_kb=buffer_kb,
                   host_events=_list(host_events), formats_dir=formats_dir, file_version=int(file_version),
                   compression=None if compression == "none" else compression, max_size=_size(max_size),
                   max_metadata=_size(max_metadata) or (64 << 20), keep_raw=keep_raw, base=base, kallsyms=kallsyms,
                   connect_timeout=connect_timeout)
    stop = threading.Event()
    session = Recording(list(guests), opts, stop=stop)
    err = Console(stderr=True, highlight=False)
    previous = signal.getsignal(signal.SIGINT)

    def on_sigint(signum, frame):
        # The first Ctrl-C stops cleanly (files are still written); a second one aborts.
        if stop.is_set():
            signal.signal(signal.SIGINT, previous)
            raise KeyboardInterrupt
        stop.set()

    signal.signal(signal.SIGINT, on_sigint)
    signal.signal(signal.SIGTERM, on_sigint)
    try:
        if quiet or not err.is_terminal:
            doc = session.run()
        else:
            with Live(console=err, refresh_per_second=4, transient=True) as live:
                session.progress = Progress(live)
                doc = session.run()
    finally:
        signal.signal(signal.SIGINT, previous)
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 160)
    out.print(summary_table(doc))
    # Problems carry guest text: never rich markup. They are warnings on stderr when the
    # recording succeeded; when it failed, stderr holds the one error line and the
    # problems go with the rest of the report.
    to = out if doc["errors"] else err
    for name, e in list(doc["guests"].items()) + ([("host", doc["host"])] if doc.get("host") else []):
        for p in e["problems"]:
            to.print("%s: %s" % (name, p), markup=False, soft_wrap=True)
    out.print("session: %s/session.json" % doc["outdir"], markup=False, soft_wrap=True)
    for e in list(doc["guests"].values()) + ([doc["host"]] if doc.get("host") else []):
        if e.get("file"):
            out.print("wrote %s/%s" % (doc["outdir"], e["file"]), markup=False, soft_wrap=True)
    if doc["errors"]:
        raise VmtraceError("; ".join(doc["errors"])[:500])
