"""`vmtrace sql SESSION_DIR "SELECT ..."`: SQL over a session, on DuckDB.

The session is exported once to Parquet (``SESSION_DIR/parquet``, partitioned by
source and CPU, see vmtrace.export.session_parquet) and reused while it is newer than
the session's files; the query sees a view ``events`` with columns ts (host ns),
raw_ts, pid, comm, system, event, fields (map of strings), source, cpu. The same files
answer the same SQL in Spark or Trino (docs/timeline.md).
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import sys
import tempfile

import click

from vmtrace.errors import VmtraceError


def _stale(session_dir: str, pq_dir: str) -> bool:
    mark = os.path.join(pq_dir, "_SUCCESS")
    if not os.path.exists(mark):
        return True
    built = os.path.getmtime(mark)
    for name in os.listdir(session_dir):
        if name == "session.json" or name.endswith(".dat"):
            if os.path.getmtime(os.path.join(session_dir, name)) > built:
                return True
    return False


def parquet_for(session_dir: str, out: str | None = None, refresh: bool = False) -> str:
    """The session's Parquet directory, (re)built when missing or stale."""
    from vmtrace.export.session_parquet import write_session_parquet
    from vmtrace.merge import Session

    s = Session(session_dir)          # validates the directory before anything is written
    target = out or os.path.join(session_dir, "parquet")
    if out is None and not os.access(session_dir, os.W_OK):
        key = hashlib.sha1(os.path.abspath(session_dir).encode()).hexdigest()[:16]
        target = os.path.join(tempfile.gettempdir(), "vmtrace-sql-" + key)
    if refresh or _stale(session_dir, target):
        write_session_parquet(s, target)
    return target


def connect(pq_dir: str):
    import duckdb
    con = duckdb.connect()
    glob = os.path.join(pq_dir, "**", "*.parquet").replace("'", "''")
    con.execute("CREATE VIEW events AS SELECT * FROM read_parquet('%s', hive_partitioning = true, "
                "union_by_name = true)" % glob)
    return con


def _cell(v) -> str:
    if v is None:
        return "NULL"
    if isinstance(v, float):
        return "%.6g" % v
    return str(v)


@click.command("sql")
@click.argument("session_dir", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table", show_default=True)
@click.option("--parquet", "pq_out", type=click.Path(file_okay=False), default=None,
              help="Where to keep the Parquet export (default SESSION_DIR/parquet).")
@click.option("--refresh", is_flag=True, help="Rebuild the Parquet export even if it looks current.")
def command(session_dir: str, query: str, fmt: str, pq_out: str | None, refresh: bool) -> None:
    """Run QUERY against the view `events` of SESSION_DIR (all sources, host clock)."""
    import duckdb

    pq_dir = parquet_for(session_dir, pq_out, refresh)
    if not os.path.exists(os.path.join(pq_dir, "_SUCCESS")):
        raise VmtraceError("%s: Parquet export incomplete" % pq_dir)
    if not any(f.endswith(".parquet") for _r, _d, fs in os.walk(pq_dir) for f in fs):
        raise VmtraceError("%s: the session has no events to query" % session_dir)
    con = connect(pq_dir)
    try:
        cur = con.execute(query)
    except duckdb.Error as exc:
        raise VmtraceError("sql: %s" % str(exc).splitlines()[0])
    if cur.description is None:
        return
    cols = [d[0] for d in cur.description]
    rows = cur.fetchall()
    out = sys.stdout
    if fmt == "csv":
        w = csv.writer(out)
        w.writerow(cols)
        w.writerows(rows)
    elif fmt == "jsonl":
        for r in rows:
            out.write(json.dumps(dict(zip(cols, r)), default=str) + "\n")
    else:
        text = [[_cell(v) for v in r] for r in rows]
        widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(cols)]
        out.write("  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip() + "\n")
        out.write("  ".join("-" * w for w in widths) + "\n")
        for r in text:
            out.write("  ".join(v.rjust(w) if _num(v) else v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")
        out.write("(%d row%s)\n" % (len(rows), "" if len(rows) == 1 else "s"))


def _num(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False
