"""A fleet dataset: many sessions of many hosts as one Parquet table (``vmtrace export``).

A session directory answers questions about one host for one stretch of time. People
who run VMs at scale ask across hosts and days ("which guests had wake-up latencies
above 1 ms last week, on which hosts"), so sessions are appended to one directory tree
that DuckDB reads on a laptop and Spark, Trino or Athena read from object storage:

    DIR/_vmtrace_dataset.json                           the manifest (below)
    DIR/host=H/guest=G/date=YYYY-MM-DD/part-ID.parquet  one file per session and source

The partition columns live in the path only (Hive layout), so an engine skips whole
hosts, guests and days without opening a file. ``guest=host`` holds the hypervisor's
own trace (no guest can be named ``host``). Inside a file the rows are in time order
and cut into one row group per time slice (``slice_ns``), so the ``ts`` statistics of
each row group let a time filter skip the rest of the file too.

Why this shape:
- Re-exporting a session never duplicates it: a session has a stable id (``id`` in
  session.json, else a digest of session.json's bytes), its files are named after it,
  and the manifest says what is already there; the same id is skipped, or replaced
  with ``replace=True``. Files are written under hidden temporary names and renamed
  into place only when every source of the session is complete, and the manifest is
  replaced atomically last, so a crash or a full disk leaves the dataset as it was
  (at worst a hidden temporary file, which no engine reads).
- One schema for every event type: the common fields and the fields the standard
  scheduling queries need are typed columns; every field of every event is also kept
  as text in the ``fields`` map, so an event or field the schema does not know (a new
  kernel, a kprobe) is never lost and never forces a schema change. Adding a typed
  column later bumps :data:`SCHEMA_VERSION`; engines read old and new files together
  by column name (DuckDB ``union_by_name``, Spark ``mergeSchema``).
- Session files are untrusted: session.json is read through :mod:`vmtrace.session`
  (size and value limits), names that become directory names must match
  :data:`_PART_VALUE`, field texts are cut at :data:`MAX_FIELD_CHARS`, and the manifest
  of an existing dataset is size-limited and checked before a file it names is touched.
"""
from __future__ import annotations

import datetime as _dt
import errno
import fcntl
import gc
import hashlib
import json
import os
import re
import socket
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

from vmtrace.errors import VmtraceError

SCHEMA_VERSION = 1
LAYOUT = "vmtrace-dataset"
MANIFEST = "_vmtrace_dataset.json"      # "_" first: Spark and Hive skip it when listing data
LOCK = "_vmtrace_dataset.lock"
HOST_GUEST = "host"                     # the guest partition of the hypervisor's own trace
LOST = "lost_events"
SLICE_NS = 10_000_000_000               # one row group per 10 s of trace by default
MAX_GROUP_ROWS = 1 << 20                # ... and never more rows than this in memory
MAX_FIELD_CHARS = 4096                  # a field's text; an event payload is < 1 page anyway
MAX_MANIFEST = 64 << 20
MAX_SESSION_JSON = 128 << 20            # as vmtrace.session reads it
_PART_VALUE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
_SESSION_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\Z")
_DATE = re.compile(r"^[0-9]{4}-[0-9]{2}-[0-9]{2}\Z")
_FILE = re.compile(r"^host=[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/guest=[A-Za-z0-9][A-Za-z0-9_.-]{0,127}/"
                   r"date=[0-9]{4}-[0-9]{2}-[0-9]{2}/part-[A-Za-z0-9][A-Za-z0-9_.-]{0,63}\.parquet\Z")

# name -> arrow type name; the order is the files' column order. Partition columns
# (host, guest, date) are not stored in the files.
COLUMNS: Tuple[Tuple[str, str], ...] = (
    ("session", "string"),      # the session id (manifest key)
    ("seq", "int64"),           # position in its source's stream: a total order for ties in ts
    ("ts", "int64"),            # host CLOCK_MONOTONIC ns (the session's merged timeline)
    ("raw_ts", "int64"),        # as the source recorded it, on its own trace clock
    ("cpu", "int32"),
    ("pid", "int32"),           # -1 on lost-events records
    ("comm", "string"),
    ("system", "string"),
    ("event", "string"),        # bare name, as trace-cmd prints it: sched_switch, lost_events
    ("prev_comm", "string"), ("prev_pid", "int32"), ("prev_prio", "int32"), ("prev_state", "int64"),
    ("next_comm", "string"), ("next_pid", "int32"), ("next_prio", "int32"),
    ("wake_comm", "string"), ("wake_pid", "int32"), ("wake_prio", "int32"), ("target_cpu", "int32"),
    ("lost_count", "int64"),    # lost_events: events the kernel dropped here (-1: unknown)
    ("fields", "map<string,string>"),   # every field of the event, as text
)
PARTITIONS = (("host", "string"), ("guest", "string"), ("date", "string"))

_SWITCH = {"prev_comm": "prev_comm", "prev_pid": "prev_pid", "prev_prio": "prev_prio",
           "prev_state": "prev_state", "next_comm": "next_comm", "next_pid": "next_pid",
           "next_prio": "next_prio"}
_WAKE = {"comm": "wake_comm", "pid": "wake_pid", "prio": "wake_prio", "target_cpu": "target_cpu"}
WAKE_EVENTS = ("sched_wakeup", "sched_wakeup_new", "sched_waking")
_INT32 = {n for n, t in COLUMNS if t == "int32"}
_INT64 = {n for n, t in COLUMNS if t == "int64"}

# Friendly views, in SQL both DuckDB and Spark accept (`CREATE TEMPORARY VIEW name AS ...`
# over a view `events` that the engine defines on the files).
VIEWS: Dict[str, str] = {
    "sched_switch": "SELECT host, guest, date, session, seq, ts, cpu, prev_comm, prev_pid, prev_prio, "
                    "prev_state, next_comm, next_pid, next_prio FROM events WHERE event = 'sched_switch'",
    "wakeups": "SELECT host, guest, date, session, seq, ts, cpu, event, wake_comm, wake_pid, wake_prio, "
               "target_cpu FROM events WHERE event IN ('sched_wakeup', 'sched_wakeup_new')",
    "lost": "SELECT host, guest, date, session, ts, cpu, lost_count FROM events WHERE event = 'lost_events'",
}


def arrow_schema() -> Any:
    import pyarrow as pa
    types = {"string": pa.string(), "int32": pa.int32(), "int64": pa.int64(),
             "map<string,string>": pa.map_(pa.string(), pa.string())}
    return pa.schema([(n, types[t]) for n, t in COLUMNS],
                     metadata={b"vmtrace.dataset.schema_version": str(SCHEMA_VERSION).encode()})


# -- the manifest ------------------------------------------------------------------------
def manifest_path(root: str) -> str:
    return os.path.join(root, MANIFEST)


def empty_manifest() -> Dict[str, Any]:
    return {"layout": LAYOUT, "schema_version": SCHEMA_VERSION,
            "columns": [[n, t] for n, t in COLUMNS], "partitions": [p for p, _ in PARTITIONS],
            "sessions": {}, "hosts": {}}


def read_manifest(root: str) -> Dict[str, Any]:
    """The manifest of dataset ``root``, checked: it names the files a replace deletes."""
    path = manifest_path(root)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_MANIFEST + 1)
    except FileNotFoundError:
        raise VmtraceError("%s: not a vmtrace dataset (no %s)" % (root, MANIFEST)) from None
    except OSError as exc:
        raise VmtraceError("%s: unreadable: %s" % (path, exc.strerror)) from None
    if len(raw) > MAX_MANIFEST:
        raise VmtraceError("%s: larger than %d bytes; not a dataset manifest" % (path, MAX_MANIFEST))
    try:
        doc = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise VmtraceError("%s: unreadable (not JSON)" % path) from None
    if not isinstance(doc, dict) or doc.get("layout") != LAYOUT:
        raise VmtraceError("%s: not a vmtrace dataset manifest" % path)
    ver = doc.get("schema_version")
    if not isinstance(ver, int) or isinstance(ver, bool) or ver < 1:
        raise VmtraceError("%s: bad schema_version %r" % (path, ver))
    if ver > SCHEMA_VERSION:
        raise VmtraceError("%s: schema version %d was written by a newer vmtrace (this one writes %d)"
                           % (path, ver, SCHEMA_VERSION))
    sessions = doc.get("sessions")
    if not isinstance(sessions, dict):
        raise VmtraceError("%s: 'sessions' must be an object" % path)
    for sid, s in sessions.items():
        if not _SESSION_ID.match(sid) or not isinstance(s, dict):
            raise VmtraceError("%s: bad session entry %.60r" % (path, sid))
        sources = s.get("sources")
        if not isinstance(sources, dict):
            raise VmtraceError("%s: session %s: 'sources' must be an object" % (path, sid))
        for name, g in sources.items():
            if not isinstance(g, dict) or not isinstance(g.get("file"), str) or not _FILE.match(g["file"]):
                raise VmtraceError("%s: session %s: source %.60r: bad file entry" % (path, sid, name))
    return doc


def _summarise(doc: Dict[str, Any]) -> None:
    """Recompute the per-host overview from the session entries."""
    hosts: Dict[str, Any] = {}
    for sid, s in doc["sessions"].items():
        h = hosts.setdefault(s["host"], {"sessions": 0, "guests": set(), "rows": 0, "dates": set(),
                                         "ts_min": None, "ts_max": None})
        h["sessions"] += 1
        h["dates"].add(s["date"])
        for name, g in s["sources"].items():
            h["guests"].add(name)
            h["rows"] += g.get("rows", 0)
        for k, pick in (("ts_min", min), ("ts_max", max)):
            if s.get(k) is not None:
                h[k] = s[k] if h[k] is None else pick(h[k], s[k])
    doc["hosts"] = {n: dict(h, guests=sorted(h["guests"]), dates=sorted(h["dates"]))
                    for n, h in sorted(hosts.items())}
    doc["rows"] = sum(h["rows"] for h in hosts.values())


def _write_manifest(root: str, doc: Dict[str, Any]) -> None:
    _summarise(doc)
    tmp = os.path.join(root, ".%s.tmp-%d" % (MANIFEST, os.getpid()))
    try:
        with open(tmp, "w") as f:
            json.dump(doc, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, manifest_path(root))
    except OSError:
        _unlink(tmp)
        raise


def open_dataset(root: str, create: bool) -> Dict[str, Any]:
    """The manifest of ``root``; with ``create``, a new dataset in a missing or empty
    directory. A non-empty directory without a manifest is someone else's: refused."""
    if os.path.isfile(manifest_path(root)):
        return read_manifest(root)
    if os.path.exists(root) and not os.path.isdir(root):
        raise VmtraceError("%s: not a directory" % root)
    if os.path.isdir(root) and [n for n in os.listdir(root) if n != LOCK]:
        raise VmtraceError("%s: not a vmtrace dataset (no %s) and not empty; export into a new "
                           "or empty directory" % (root, MANIFEST))
    if not create:
        raise VmtraceError("%s: not a vmtrace dataset (no %s)" % (root, MANIFEST))
    return empty_manifest()


# -- one session's identity ---------------------------------------------------------------
@dataclass
class SessionInfo:
    path: str
    id: str
    host: str
    date: str
    meta: Dict[str, Any]


def session_id(session_dir: str, meta: Dict[str, Any]) -> str:
    """``id`` from session.json when it has a usable one, else ``sha256-`` and the first
    20 hex digits of session.json's bytes: stable for the same recording wherever it is
    copied, different for any other."""
    sid = meta.get("id")
    if isinstance(sid, str) and _SESSION_ID.match(sid):
        return sid
    h = hashlib.sha256()
    with open(os.path.join(session_dir, "session.json"), "rb") as f:
        h.update(f.read(MAX_SESSION_JSON + 1))
    return "sha256-" + h.hexdigest()[:20]


def _part_value(value: Any, what: str, where: str) -> str:
    if not isinstance(value, str) or not _PART_VALUE.match(value):
        raise VmtraceError("%s: %s %.60r cannot name a partition (letters, digits, '_', '.', '-'; "
                           "at most 128, not starting with '_', '.' or '-')" % (where, what, value))
    return value


def session_date(session_dir: str, meta: Dict[str, Any]) -> str:
    """The UTC day the session started. Trace timestamps are CLOCK_MONOTONIC, which says
    nothing about the calendar: the date comes from session.json's ``wall_clock``
    anchor (``{"mono_ns", "realtime_ns"}``, both read together when recording started)
    when present, else from when session.json was last written."""
    wall = meta.get("wall_clock")
    if isinstance(wall, dict) and isinstance(wall.get("realtime_ns"), int) and 0 < wall["realtime_ns"] < 1 << 62:
        secs = wall["realtime_ns"] / 1e9
    else:
        secs = os.stat(os.path.join(session_dir, "session.json")).st_mtime
    return _dt.datetime.fromtimestamp(secs, _dt.timezone.utc).strftime("%Y-%m-%d")


def describe(src: Any, host: Optional[str], date: Optional[str]) -> SessionInfo:
    """A session's id, host and date, from the options or else its session.json."""
    meta = src.session.meta
    where = os.path.join(src.name, "session.json")
    if host is None:
        host = meta.get("hostname") if meta.get("hostname") is not None else socket.gethostname().split(".")[0]
        host = _part_value(host, "host name", where + " (or give --host)")
    else:
        host = _part_value(host, "host name", "--host")
    if date is None:
        date = session_date(src.name, meta)
    elif not _DATE.match(date):
        raise VmtraceError("--date %.40r: want YYYY-MM-DD" % date)
    for name in src.source_names():
        _part_value(name, "source name", where)
    return SessionInfo(src.name, session_id(src.name, meta), host, date, meta)


# -- rows ----------------------------------------------------------------------------------
def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray, memoryview)):
        v = bytes(v).split(b"\0", 1)[0].decode("utf-8", "replace")
    elif not isinstance(v, str):
        if hasattr(v, "tolist"):
            v = v.tolist()
        v = str(v)
    return v.rstrip("\n")[:MAX_FIELD_CHARS]


def _int(v: Any, bits: int) -> Optional[int]:
    if v is None:
        return None
    try:
        i = int(v)
    except (TypeError, ValueError):
        return None
    lim = 1 << (bits - 1)
    return i if -lim <= i < lim else None


_TYPED = ("prev_comm", "prev_pid", "prev_prio", "prev_state", "next_comm", "next_pid", "next_prio",
          "wake_comm", "wake_pid", "wake_prio", "target_cpu", "lost_count")


def _field_text(v: Any) -> str:
    """A field's value as map text; ints (most fields) take the short path."""
    t = type(v)
    if t is int:
        return str(v)
    if t is str:
        return v[:MAX_FIELD_CHARS].rstrip("\n") if len(v) > MAX_FIELD_CHARS or v.endswith("\n") else v
    return _text(v)


class _Group:
    """The rows of one row group, column by column. The per-event work is kept to list
    appends: this loop is the export's cost per event."""

    def __init__(self) -> None:
        self.cols: Dict[str, list] = {n: [] for n, _ in COLUMNS}
        self.n = 0
        self._none = [self.cols[n].append for n in _TYPED]

    def add(self, sid: str, seq: int, e: Any) -> None:
        c = self.cols
        name = e.event
        fields = e.fields or {}
        c["session"].append(sid)
        c["seq"].append(seq)
        c["ts"].append(e.ts)
        c["raw_ts"].append(e.raw_ts)
        c["cpu"].append(e.cpu)
        c["pid"].append(e.pid)
        comm = e.comm
        c["comm"].append(comm if type(comm) is str and len(comm) <= MAX_FIELD_CHARS else _text(comm))
        c["system"].append(e.system if type(e.system) is str else _text(e.system))
        c["event"].append(name)
        if name == "sched_switch":
            g = fields.get
            c["prev_comm"].append(_opt_text(g("prev_comm")))
            c["prev_pid"].append(_int(g("prev_pid"), 32))
            c["prev_prio"].append(_int(g("prev_prio"), 32))
            c["prev_state"].append(_int(g("prev_state"), 64))
            c["next_comm"].append(_opt_text(g("next_comm")))
            c["next_pid"].append(_int(g("next_pid"), 32))
            c["next_prio"].append(_int(g("next_prio"), 32))
            for col in ("wake_comm", "wake_pid", "wake_prio", "target_cpu", "lost_count"):
                c[col].append(None)
        elif name in WAKE_EVENTS:
            g = fields.get
            for col in ("prev_comm", "prev_pid", "prev_prio", "prev_state", "next_comm", "next_pid",
                        "next_prio", "lost_count"):
                c[col].append(None)
            c["wake_comm"].append(_opt_text(g("comm")))
            c["wake_pid"].append(_int(g("pid"), 32))
            c["wake_prio"].append(_int(g("prio"), 32))
            c["target_cpu"].append(_int(g("target_cpu"), 32))
        elif name == LOST:
            for a in self._none[:-1]:
                a(None)
            c["lost_count"].append(_int(fields.get("count"), 64))
        else:
            for a in self._none:
                a(None)
        c["fields"].append([(k if type(k) is str else _text(k), _field_text(v)) for k, v in fields.items()])
        self.n += 1

    def table(self) -> Any:
        import pyarrow as pa
        return pa.table(self.cols, schema=arrow_schema())


def _opt_text(v: Any) -> Optional[str]:
    return None if v is None else _field_text(v)


@dataclass
class SourceResult:
    name: str
    file: str               # relative to the dataset root
    rows: int = 0
    lost_marks: int = 0
    lost_count: int = 0     # sum of known counts
    row_groups: int = 0
    ts_min: Optional[int] = None
    ts_max: Optional[int] = None
    cpus: List[int] = field(default_factory=list)

    def entry(self) -> Dict[str, Any]:
        return {"file": self.file, "rows": self.rows, "lost_marks": self.lost_marks,
                "lost_count": self.lost_count, "row_groups": self.row_groups,
                "ts_min": self.ts_min, "ts_max": self.ts_max, "cpus": self.cpus}


Progress = Callable[[str, str, int], None]   # (session id, source, rows so far)


def _write_source(src: Any, name: str, info: SessionInfo, root: str, tmp: str, rel: str,
                  slice_ns: int, progress: Optional[Progress]) -> SourceResult:
    import pyarrow.parquet as pq
    res = SourceResult(guest_partition(name), rel)
    cpus = set()
    writer = pq.ParquetWriter(tmp, arrow_schema(), compression="zstd",
                              sorting_columns=[pq.SortingColumn(COLUMNS.index(("ts", "int64")))])
    # A row group is millions of small tuples and strings; the cyclic collector would
    # walk them again and again as they pile up (measured: the export took 2.3x as
    # long). Nothing here makes cycles, so it is off while rows accumulate, and the
    # young generations are collected after each row group for anything else's.
    gc_was = gc.isenabled()
    gc.disable()
    try:
        group, cur_slice = _Group(), None
        last_report = time.monotonic()
        for seq, e in enumerate(src.events(sources=[name])):
            sl = int(e.ts) // slice_ns
            if group.n and (sl != cur_slice or group.n >= MAX_GROUP_ROWS):
                writer.write_table(group.table(), row_group_size=group.n)
                res.row_groups += 1
                group = _Group()
                gc.collect(1)
            cur_slice = sl
            group.add(info.id, seq, e)
            res.rows += 1
            cpus.add(int(e.cpu))
            if e.event == LOST:
                res.lost_marks += 1
                cnt = _int(e.fields.get("count"), 64)
                res.lost_count += cnt if cnt and cnt > 0 else 0
            if res.ts_min is None:
                res.ts_min = int(e.ts)
            res.ts_max = int(e.ts)
            if progress and res.rows % 65536 == 0 and time.monotonic() - last_report >= 1.0:
                last_report = time.monotonic()
                progress(info.id, name, res.rows)
        if group.n:
            writer.write_table(group.table(), row_group_size=group.n)
            res.row_groups += 1
    finally:
        if gc_was:
            gc.enable()
        writer.close()
    res.cpus = sorted(cpus)
    return res


def guest_partition(source_name: str) -> str:
    return HOST_GUEST if source_name == "host" else source_name


@dataclass
class ExportResult:
    session: str
    path: str
    host: str
    date: str
    action: str             # "added", "replaced", "skipped"
    rows: int = 0
    sources: int = 0
    lost_marks: int = 0
    seconds: float = 0.0


def export_session(root: str, session_dir: str, *, host: Optional[str] = None, date: Optional[str] = None,
                   replace: bool = False, slice_ns: int = SLICE_NS,
                   progress: Optional[Progress] = None) -> ExportResult:
    """Append one session to the dataset at ``root`` (created if missing or empty).

    A session already in the dataset (same id) is skipped, or with ``replace`` written
    again and its old files removed; it never appears twice.
    """
    from vmtrace.session import SessionSource
    if not isinstance(slice_ns, int) or slice_ns <= 0:
        raise VmtraceError("--slice must be a positive duration")
    t0 = time.monotonic()
    with SessionSource(session_dir) as src:
        info = describe(src, host, date)         # a bad session or name leaves no dataset behind
        with _locked(root):
            doc = open_dataset(root, create=True)
            old = doc["sessions"].get(info.id)
            if old is not None and not replace:
                return ExportResult(info.id, session_dir, old.get("host", "?"), old.get("date", "?"), "skipped")
            return _export(root, doc, src, info, old, slice_ns, progress, t0)


def _export(root: str, doc: Dict[str, Any], src: Any, info: SessionInfo, old: Optional[Dict[str, Any]],
            slice_ns: int, progress: Optional[Progress], t0: float) -> ExportResult:
    done: List[Tuple[str, str, SourceResult]] = []     # (tmp, final, result)
    try:
        for name in src.source_names():
            rel = "host=%s/guest=%s/date=%s/part-%s.parquet" % (info.host, guest_partition(name), info.date, info.id)
            final = os.path.join(root, rel)
            os.makedirs(os.path.dirname(final), exist_ok=True)
            tmp = os.path.join(os.path.dirname(final), ".part-%s.parquet.tmp-%d" % (info.id, os.getpid()))
            done.append((tmp, final, None))  # type: ignore[arg-type]
            res = _write_source(src, name, info, root, tmp, rel, slice_ns, progress)
            done[-1] = (tmp, final, res)
        for tmp, final, _res in done:
            os.replace(tmp, final)
    except OSError as exc:
        for tmp, _final, _res in done:
            _unlink(tmp)
        why = exc.strerror or str(exc)
        if exc.errno == errno.ENOSPC or "No space left" in why:     # pyarrow's errors carry no errno
            why = "disk full (%s)" % os.strerror(errno.ENOSPC)
        raise VmtraceError("%s: cannot export %s: %s; the dataset is unchanged" % (root, info.path, why)) from None
    except BaseException:
        for tmp, _final, _res in done:
            _unlink(tmp)
        raise
    new_files = {final for _t, final, _r in done}
    if old is not None:
        for g in old["sources"].values():
            p = os.path.join(root, g["file"])
            if p not in new_files:
                _unlink(p)
                _prune_empty(root, os.path.dirname(p))
    results = [r for _t, _f, r in done]
    entry = {"host": info.host, "date": info.date, "path": os.path.abspath(info.path),
             "exported_unix_ns": time.time_ns(), "schema_version": SCHEMA_VERSION,
             "slice_ns": slice_ns,
             "ts_min": min((r.ts_min for r in results if r.ts_min is not None), default=None),
             "ts_max": max((r.ts_max for r in results if r.ts_max is not None), default=None),
             "rows": sum(r.rows for r in results),
             "sources": {r.name: r.entry() for r in results}}
    doc["sessions"][info.id] = entry
    try:
        _write_manifest(root, doc)
    except OSError as exc:
        raise VmtraceError("%s: cannot write %s: %s (the session's files are in place; export it "
                           "again to record it)" % (root, MANIFEST, exc.strerror or exc)) from None
    return ExportResult(info.id, info.path, info.host, info.date, "replaced" if old else "added",
                        entry["rows"], len(results), sum(r.lost_marks for r in results), time.monotonic() - t0)


class _locked:
    """One exporter at a time per dataset (flock on ``DIR/_vmtrace_dataset.lock``)."""

    def __init__(self, root: str) -> None:
        self.root = root
        self.fd = -1

    def __enter__(self) -> None:
        # Refuse someone else's directory before leaving anything (the lock file) in it.
        open_dataset(self.root, create=True)
        try:
            os.makedirs(self.root, exist_ok=True)
            self.fd = os.open(os.path.join(self.root, LOCK), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise VmtraceError("%s: cannot open the dataset: %s" % (self.root, exc.strerror)) from None
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: Any) -> None:
        os.close(self.fd)


def _prune_empty(root: str, d: str) -> None:
    """Remove the partition directories a removed file leaves empty, up to ``root``."""
    root = os.path.abspath(root)
    d = os.path.abspath(d)
    while d != root and d.startswith(root + os.sep):
        try:
            os.rmdir(d)
        except OSError:
            return
        d = os.path.dirname(d)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


# -- reading it back -----------------------------------------------------------------------
def parquet_glob(root: str) -> str:
    """Every data file of the dataset, and nothing else (not the hidden temporaries)."""
    return os.path.join(root, "host=*", "guest=*", "date=*", "part-*.parquet")


def duckdb_connect(root: str) -> Any:
    """A DuckDB connection with the view ``events`` over the dataset (partition columns
    as text: a host named ``0042`` stays ``0042``), the friendly :data:`VIEWS`, and
    ``sessions`` from the manifest."""
    import duckdb
    doc = read_manifest(root)
    con = duckdb.connect()
    glob = parquet_glob(root).replace("'", "''")
    if doc["sessions"]:
        con.execute("CREATE VIEW events AS SELECT * FROM read_parquet('%s', hive_partitioning = true, "
                    "union_by_name = true, hive_types = {'host': VARCHAR, 'guest': VARCHAR, 'date': VARCHAR})"
                    % glob)
    else:   # an empty dataset still answers with the right columns
        cols = ", ".join("CAST(NULL AS %s) AS %s" % (_duck_type(t), n) for n, t in COLUMNS + PARTITIONS)
        con.execute("CREATE VIEW events AS SELECT %s WHERE false" % cols)
    for name, sql in VIEWS.items():
        con.execute("CREATE TEMPORARY VIEW %s AS %s" % (name, sql))
    rows = [(sid, s["host"], s["date"], len(s["sources"]), s.get("rows"), s.get("ts_min"), s.get("ts_max"),
             s.get("path")) for sid, s in sorted(doc["sessions"].items())]
    con.execute("CREATE TABLE sessions (session VARCHAR, host VARCHAR, date VARCHAR, sources INTEGER, "
                "rows BIGINT, ts_min BIGINT, ts_max BIGINT, path VARCHAR)")
    if rows:
        con.executemany("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
    return con


def _duck_type(t: str) -> str:
    return {"string": "VARCHAR", "int32": "INTEGER", "int64": "BIGINT",
            "map<string,string>": "MAP(VARCHAR, VARCHAR)"}[t]


def is_dataset(path: str) -> bool:
    return os.path.isfile(manifest_path(path))


def iter_export(root: str, sessions: Iterable[str], **kwargs: Any) -> Iterable[ExportResult]:
    for s in sessions:
        yield export_session(root, s, **kwargs)
