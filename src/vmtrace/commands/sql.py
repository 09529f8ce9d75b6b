"""`vmtrace sql SESSION_DIR "SELECT ..."`: SQL over a session, on DuckDB.

Given a fleet dataset instead (a directory `vmtrace export --dataset` made), the query
sees the whole dataset: the view ``events`` over every file (with the partition
columns host, guest, date), the views of vmtrace.export.dataset.VIEWS (sched_switch,
wakeups, lost) and the table ``sessions`` from its manifest. Nothing is written then.

The session is exported once to Parquet (``SESSION_DIR/parquet``, partitioned by
source and CPU, see vmtrace.export.session_parquet) and reused while it is newer than
the session's files; the query sees a view ``events`` with columns ts (host ns),
raw_ts, pid, comm, system, event, fields (map of strings), source, cpu. The same files
answer the same SQL in Spark or Trino (docs/timeline.md).
"""
from __future__ import annotations

import atexit
import csv
import hashlib
import json
import os
import shutil
import stat
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
    from vmtrace.session import SessionSource

    s = SessionSource(session_dir)    # validates the directory before anything is written
    target = out or os.path.join(session_dir, "parquet")
    if out is None and not os.access(session_dir, os.W_OK):
        key = hashlib.sha1(os.path.abspath(session_dir).encode()).hexdigest()[:16]
        cache = private_cache_dir()
        if cache:
            target = os.path.join(cache, "sql-" + key)
        else:   # no private cache: a private scratch export, gone when we exit
            scratch = tempfile.mkdtemp(prefix="vmtrace-sql-")   # 0700: the export below is private
            atexit.register(shutil.rmtree, scratch, True)
            target = os.path.join(scratch, "parquet")
    with s:
        if refresh or _stale(session_dir, target):
            write_session_parquet(s, target)
    return target


def _ours_and_private(path: str) -> bool:
    """A real directory (not a symlink) owned by us that no one else can write or list."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def private_cache_dir() -> str | None:
    """``$XDG_CACHE_HOME/vmtrace`` (``~/.cache/vmtrace``), made 0700 if missing; None when
    it, or the cache directory it sits in, is not ours and private.

    The export used to be kept in ``/tmp/vmtrace-sql-<hash of the path>``, a name any
    local user could create first and fill with Parquet files of their choosing.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    path = os.path.join(base, "vmtrace")
    try:
        os.makedirs(base, mode=0o700, exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError:
        return None
    st = os.lstat(base) if os.path.lexists(base) else None
    if st is None or stat.S_ISLNK(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        return None
    return path if _ours_and_private(path) else None


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
@click.argument("session_dir", metavar="SESSION_DIR|DATASET", type=click.Path(file_okay=False))
@click.argument("query")
@click.option("--format", "fmt", type=click.Choice(["table", "csv", "jsonl"]), default="table", show_default=True)
@click.option("--parquet", "pq_out", type=click.Path(file_okay=False), default=None,
              help="Where to keep the Parquet export (default SESSION_DIR/parquet).")
@click.option("--refresh", is_flag=True, help="Rebuild the Parquet export even if it looks current.")
def command(session_dir: str, query: str, fmt: str, pq_out: str | None, refresh: bool) -> None:
    """Run QUERY against the view `events` of SESSION_DIR (all sources, host clock), or
    of a whole dataset made by `vmtrace export --dataset DIR`."""
    import duckdb

    from vmtrace.export.dataset import duckdb_connect, is_dataset
    if is_dataset(session_dir):
        if pq_out or refresh:
            raise VmtraceError("%s: a dataset is queried in place; --parquet and --refresh are for a session"
                               % session_dir)
        con = duckdb_connect(session_dir)
    else:
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
