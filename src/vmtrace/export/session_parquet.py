"""Parquet export of a session, partitioned by source and CPU (Hive layout).

``OUT/source=host/cpu=0/part-00000.parquet``, ``OUT/source=guest1/cpu=1/...``: the
directory names carry the partition columns, the layout every engine understands
(DuckDB and pyarrow here; Spark, Trino/Presto, Athena, BigQuery external tables at
fleet scale), so a query that filters on a guest or a CPU reads only those files.

Columns: ``ts`` (host CLOCK_MONOTONIC ns, the merged timeline), ``raw_ts`` (as the
source recorded it), ``pid``, ``comm``, ``system``, ``event``, and ``fields`` as a
``map<string, string>``: one schema for every event type, so files of different
guests and kernels always union; typed access is a cast away in SQL.
"""
from __future__ import annotations

import os
import shutil
from typing import Any, Dict, List, Optional

from vmtrace.errors import VmtraceError

ROWS_PER_FILE = 1_000_000
SUCCESS = "_SUCCESS"


def _schema():
    import pyarrow as pa
    return pa.schema([
        ("ts", pa.int64()), ("raw_ts", pa.int64()), ("pid", pa.int32()), ("comm", pa.string()),
        ("system", pa.string()), ("event", pa.string()),
        ("fields", pa.map_(pa.string(), pa.string())),
    ])


def _s(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return bytes(v).split(b"\0", 1)[0].decode("utf-8", "replace")
    if isinstance(v, str):
        return v.rstrip("\n")
    if hasattr(v, "tolist"):
        v = v.tolist()
    return str(v)


class _Part:
    def __init__(self) -> None:
        self.cols: Dict[str, list] = {n: [] for n in ("ts", "raw_ts", "pid", "comm", "system", "event", "fields")}
        self.files = 0

    def add(self, e: Any) -> None:
        c = self.cols
        c["ts"].append(int(e.ts))
        c["raw_ts"].append(int(e.raw_ts))
        c["pid"].append(int(e.pid))
        c["comm"].append(e.comm)
        c["system"].append(e.system)
        c["event"].append(e.event)
        c["fields"].append([(k, _s(v)) for k, v in e.fields.items()])

    def __len__(self) -> int:
        return len(self.cols["ts"])

    def flush(self, directory: str) -> Optional[str]:
        import pyarrow as pa
        import pyarrow.parquet as pq
        if not len(self):
            return None
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, "part-%05d.parquet" % self.files)
        pq.write_table(pa.table(self.cols, schema=_schema()), path, compression="zstd")
        self.files += 1
        for v in self.cols.values():
            v.clear()
        return path


def write_session_parquet(session: Any, out_dir: str, *, rows_per_file: int = ROWS_PER_FILE,
                          selection: Any = None) -> List[str]:
    """Write every selected source's events (on the host clock) under ``out_dir``; return
    the files.

    ``session`` is a session directory or a :class:`vmtrace.session.SessionSource`. The
    output directory is replaced as a whole, and ``_SUCCESS`` is written last so readers
    (and ``vmtrace sql``'s cache) never take a half-written export for a complete one.
    """
    from vmtrace.session import SessionSource
    from vmtrace.source import EVERYTHING
    if isinstance(session, SessionSource):
        return _write(session, out_dir, rows_per_file, selection or EVERYTHING)
    with SessionSource(os.fspath(session)) as src:
        return _write(src, out_dir, rows_per_file, selection or EVERYTHING)


def _write(src: Any, out_dir: str, rows_per_file: int, selection: Any) -> List[str]:
    out_dir = os.fspath(out_dir)
    tmp = out_dir.rstrip("/") + ".writing"
    shutil.rmtree(tmp, ignore_errors=True)
    files: List[str] = []
    try:
        sel = selection.kwargs()
        names = sel.pop("sources") or src.source_names()
        for name in [n for n in src.source_names() if n in names]:
            parts: Dict[int, _Part] = {}
            for e in src.events(sources=[name], **sel):
                p = parts.get(e.cpu)
                if p is None:
                    p = parts[e.cpu] = _Part()
                p.add(e)
                if len(p) >= rows_per_file:
                    files.append(p.flush(_partition(tmp, name, e.cpu)))
            for cpu, p in parts.items():
                f = p.flush(_partition(tmp, name, cpu))
                if f:
                    files.append(f)
        os.makedirs(tmp, exist_ok=True)
        open(os.path.join(tmp, SUCCESS), "w").close()
        shutil.rmtree(out_dir, ignore_errors=True)
        os.rename(tmp, out_dir)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        raise VmtraceError("cannot write Parquet export to %s: %s" % (out_dir, exc.strerror or exc))
    return [f.replace(tmp, out_dir, 1) for f in files]


def _partition(root: str, source: str, cpu: int) -> str:
    return os.path.join(root, "source=%s" % source, "cpu=%d" % cpu)
