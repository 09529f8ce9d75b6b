"""`vmtrace export SESSION... --dataset DIR`: append sessions to a fleet dataset.

The dataset (vmtrace.export.dataset, docs/timeline.md) is Parquet partitioned by host,
guest and date, which DuckDB (`vmtrace sql DIR`) and Spark read as one table. A session
already in it is skipped (``--replace`` writes it again), so exporting the same
directories twice never duplicates a row.
"""
from __future__ import annotations

import re
import sys
import time
from typing import Optional

import click

from vmtrace.errors import VmtraceError

_DUR = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(ns|us|ms|s|m|h)?\Z")
_UNIT = {"ns": 1, "us": 10**3, "ms": 10**6, "s": 10**9, "m": 60 * 10**9, "h": 3600 * 10**9}


def duration_ns(text: str, opt: str) -> int:
    m = _DUR.match(text.strip())
    ns = int(float(m.group(1)) * _UNIT[m.group(2) or "s"]) if m else 0
    if ns <= 0 or ns > 366 * 86400 * 10**9:
        raise VmtraceError("%s %.40r: want a positive duration like 500ms, 10s or 5m" % (opt, text))
    return ns


@click.command("export")
@click.argument("sessions", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--dataset", "dataset", required=True, type=click.Path(),
              help="The dataset directory (created if missing; must be ours or empty).")
@click.option("--host", default=None, help="Host partition for these sessions (default: session.json "
              "'hostname', else this machine's name).")
@click.option("--date", default=None, help="Date partition YYYY-MM-DD (default: the session's start, UTC).")
@click.option("--replace", is_flag=True, help="Write sessions already in the dataset again (default: skip them).")
@click.option("--slice", "slice_", default="10s", show_default=True,
              help="Trace time per Parquet row group: the unit a time filter can skip.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines, only the summary.")
def command(sessions: tuple, dataset: str, host: Optional[str], date: Optional[str], replace: bool,
            slice_: str, quiet: bool) -> None:
    """Append SESSION directories to the Parquet dataset DIR (Hive layout host=/guest=/date=)."""
    from vmtrace.export.dataset import export_session

    slice_ns = duration_ns(slice_, "--slice")
    err = sys.stderr
    show = not quiet

    def progress(sid: str, source: str, rows: int) -> None:
        if show:
            err.write("vmtrace: export %s %s: %d events\n" % (sid, source, rows))
            err.flush()

    t0 = time.monotonic()
    added = skipped = rows = lost = 0
    for i, s in enumerate(sessions, 1):
        r = export_session(dataset, s, host=host, date=date, replace=replace, slice_ns=slice_ns,
                           progress=progress)
        if r.action == "skipped":
            skipped += 1
            line = "skipped %s: already in the dataset as session %s (host %s, %s); --replace writes it again" % (
                s, r.session, r.host, r.date)
        else:
            added += 1
            rows += r.rows
            lost += r.lost_marks
            rate = r.rows / r.seconds if r.seconds > 0 else 0.0
            line = "%s %s as session %s: host %s, %s, %d sources, %d events, %.1f s (%.0f events/s)" % (
                r.action, s, r.session, r.host, r.date, r.sources, r.rows, r.seconds, rate)
        if show:
            err.write("vmtrace: [%d/%d] %s\n" % (i, len(sessions), line))
    from vmtrace.export.dataset import read_manifest
    doc = read_manifest(dataset)
    sources = sum(len(h["guests"]) for h in doc["hosts"].values())
    dt = time.monotonic() - t0
    err.write("vmtrace: exported %d session%s (%d skipped), %d events%s in %.1f s; dataset %s now holds "
              "%d session%s from %d host%s, %d guest partitions, %d events\n" % (
                  added, "" if added == 1 else "s", skipped, rows,
                  " and %d lost-events markers" % lost if lost else "", dt, dataset,
                  len(doc["sessions"]), "" if len(doc["sessions"]) == 1 else "s",
                  len(doc["hosts"]), "" if len(doc["hosts"]) == 1 else "s", sources, doc.get("rows", 0)))
