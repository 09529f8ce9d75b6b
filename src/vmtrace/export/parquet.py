"""Parquet: typed columns for DuckDB locally and Spark at fleet scale.

Two shapes, because they answer different questions:
- one file of all events (ts, cpu, pid, comm, event), the timeline every query starts
  from, written batch by batch so a large trace never sits in memory as one table;
- a directory with one file per event type (``event=system:name/part.parquet``, the
  Hive layout Spark and DuckDB both read) whose columns are that event's own fields,
  decoded columnar.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from vmtrace.export import Export

__all__ = ["write_parquet", "write_partitioned", "write"]

FORMAT = Export("parquet", "one Parquet file of all events (a session: a directory partitioned by "
                "source and CPU, for DuckDB and Spark)", needs_file=True)

_SAFE = re.compile(r"[^A-Za-z0-9_.:\-]")


def write_parquet(trace: Any, path: Union[str, os.PathLike], *,
                  cpus: Optional[Iterable[int]] = None, events: Optional[Sequence[str]] = None,
                  start: Any = None, end: Any = None, buffer: Optional[str] = None,
                  compression: str = "zstd", sources: Optional[Sequence[str]] = None) -> int:
    """All selected events as one Parquet file, sorted by (ts, cpu); returns the row count.

    Sorting needs the whole table, so this holds one table of five narrow columns
    (about 20 bytes per event); use :func:`write_partitioned` for per-event fields.
    """
    import pyarrow.parquet as pq
    table = trace.table(cpus=cpus, events=events, start=start, end=end, buffer=buffer, sources=sources)
    pq.write_table(table, os.fspath(path), compression=compression)
    return table.num_rows


def write_partitioned(trace: Any, directory: Union[str, os.PathLike], *,
                      events: Optional[Sequence[str]] = None, cpus: Optional[Iterable[int]] = None,
                      start: Any = None, end: Any = None, buffer: Optional[str] = None,
                      compression: str = "zstd", row_group: int = 1 << 16) -> Dict[str, int]:
    """One Parquet file per event type with typed field columns; returns {event: rows}.

    The trace is decoded once and each type's rows are written as they come, a row
    group at a time, so memory stays bounded. Rows are grouped per CPU chunk, not
    globally sorted: ``ORDER BY ts`` in the query when order matters.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq
    from vmtrace.tables import event_schema
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    writers: Dict[str, Any] = {}
    pending: Dict[str, List[Any]] = {}
    rows: Dict[str, int] = {}

    def flush(name: str, schema: Any) -> None:
        tables = pending.pop(name, [])
        if not tables:
            return
        if name not in writers:
            part = out / f"event={_SAFE.sub('_', name)}"
            part.mkdir(exist_ok=True)
            writers[name] = pq.ParquetWriter(part / "part-0.parquet", schema,
                                             compression=compression)
        table = pa.concat_tables(tables).unify_dictionaries() if len(tables) > 1 else tables[0]
        writers[name].write_table(table.combine_chunks())

    schemas: Dict[str, Any] = {}
    try:
        for fmt, cols in trace.event_parts(events, cpus, start, end, buffer):
            name = fmt.full_name
            schema = schemas.get(name)
            if schema is None:
                schema = schemas[name] = event_schema(fmt)
            t = pa.table(cols, schema=schema)
            pending.setdefault(name, []).append(t)
            rows[name] = rows.get(name, 0) + t.num_rows
            if sum(x.num_rows for x in pending[name]) >= row_group:
                flush(name, schema)
        for name in list(pending):
            flush(name, schemas[name])
    finally:
        for w in writers.values():
            w.close()
    return dict(sorted(rows.items(), key=lambda kv: (-kv[1], kv[0])))


def write(source: Any, out: str, selection: Any) -> Optional[str]:
    """The registry's entry: one file for a trace, a partitioned directory for a session."""
    if source.kind == "session":
        from vmtrace.export.session_parquet import write_session_parquet
        files = write_session_parquet(source, out, selection=selection)
        return "wrote %d Parquet file%s under %s" % (len(files), "" if len(files) == 1 else "s", out)
    write_parquet(source, out, **selection.kwargs())
    return None
