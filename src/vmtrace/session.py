"""One timeline for the host and all guests of a recording session.

A session directory (written by ``vmtrace record``) holds ``session.json``, ``host.dat``
and one ``NAME.dat`` per guest. Each guest traced with its own clock; the session keeps
the time probes exchanged with its agent. This module opens the session, builds one
clock map per guest (:mod:`vmtrace.clocksync`), and streams every source's events in
host-clock order, each tagged with its source.

Each trace is already in time order, and clock maps are monotonic, so the sources are
interleaved by the one k-way merge (:mod:`vmtrace.merge`), memory flat however long the
recording. :class:`SessionSource` is the session as a :mod:`vmtrace.source` Source.

session.json is read as untrusted input (anyone can hand a directory to ``vmtrace
check``, and the recorder wrote guest-derived values into it): numbers must fit int64,
probes and orders must have their documented shapes, file names must stay inside the
directory, and anything else is one VmtraceError naming the guest and the field. A
guest recorded without a trace.dat (``"file": null``) is skipped, not fatal.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

import numpy as np

from vmtrace.clocksync import ClockMap, IdentityMap, SyncReport, build_map, marker_seq
from vmtrace.errors import VmtraceError
from vmtrace.merge import keyed, ordered
from vmtrace.values import MAX_CPUS, NS_MAX, clock_name, is_int, short

HOST = "host"
# Clocks that user space reads exactly (the agent's guest_ns is then the trace clock).
EXACT_CLOCKS = {"mono", "mono_raw", "boot", "tai"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+\Z")
_MARK = re.compile(r"vmtrace-(probe|order)\b(.*)")
_KV = re.compile(r"(\w+)=(\S+)")
BATCH = 4096
# session.json holds at most 65536 probes (~70 bytes each) per guest (host/conversation.py)
MAX_SESSION_JSON = 128 << 20

Reader = Callable[[str], Iterable[Any]]


class MergedEvent(NamedTuple):
    """One event on the merged timeline. ``ts`` is host CLOCK_MONOTONIC ns; ``raw_ts``
    the timestamp as the source recorded it."""

    ts: int
    source: str
    cpu: int
    pid: int
    comm: str
    event: str
    fields: dict
    system: str = ""
    raw_ts: int = 0
    origin: Any = None      # the source's own event (vmtrace.api), for rendering its text


@dataclass
class Source:
    name: str
    path: str
    clock: str
    is_host: bool = False
    cpus: int = 0
    probes: list = field(default_factory=list)
    orders: list = field(default_factory=list)
    sync: Optional[dict] = None
    stats: dict = field(default_factory=dict)


def default_reader(path: str) -> Iterable[Any]:
    """Events of one trace.dat via ``vmtrace.open`` (the decoder)."""
    try:
        from vmtrace.api import open as api_open
    except ImportError:
        raise VmtraceError("cannot read %s: the trace decoder (vmtrace.api) is not installed" % path)
    return api_open(path).events()


class Session:
    """A recording session directory: sources, their clock maps, their events."""

    def __init__(self, directory: str, reader: Optional[Reader] = None):
        self.dir = os.fspath(directory)
        self.reader = reader or default_reader
        meta_path = os.path.join(self.dir, "session.json")
        if not os.path.isdir(self.dir):
            raise VmtraceError("%s: not a directory" % self.dir)
        meta = _load_session_json(meta_path)
        self.meta = meta
        self.sources: Dict[str, Source] = {}
        self.skipped: Dict[str, str] = {}   # guests recorded without a trace.dat: why
        host = meta.get("host")
        if isinstance(host, dict) and host.get("file"):
            self.sources[HOST] = Source(HOST, self._file(host["file"], HOST), "mono", True)
        guests = meta.get("guests") or {}
        if not isinstance(guests, dict):
            raise VmtraceError("%s: 'guests' must be an object" % meta_path)
        for name, g in guests.items():
            if not _NAME.match(name) or name == HOST:
                raise VmtraceError("%s: bad guest name %s" % (meta_path, short(name)))
            if not isinstance(g, dict) or "file" not in g:
                raise VmtraceError("%s: guest %s has no 'file'" % (meta_path, name))
            if g["file"] is None:
                problems = g.get("problems")
                why = problems[0] if isinstance(problems, list) and problems and isinstance(problems[0], str) \
                    else "no trace.dat was written"
                self.skipped[name] = why[:300]
                continue
            self.sources[name] = _guest_source(meta_path, name, g, self._file(g["file"], name))
        if not self.sources:
            raise VmtraceError("%s: session has no host and no guest with a trace.dat" % meta_path)
        self._maps: Dict[str, ClockMap] = {}
        self.reports: Dict[str, SyncReport] = {}
        self._markers: Dict[str, list] = {}

    def _file(self, rel: Any, who: str) -> str:
        if not isinstance(rel, str) or not rel or "\0" in rel or os.path.isabs(rel) or ".." in rel.split("/"):
            raise VmtraceError("session.json: %s: file %s must be a name inside the session directory"
                               % (who, short(rel)))
        return os.path.join(self.dir, rel)

    @property
    def guests(self) -> List[str]:
        return [n for n, s in self.sources.items() if not s.is_host]

    # -- raw events ----------------------------------------------------------------
    def raw_events(self, name: str) -> Iterable[Any]:
        src = self.source(name)
        if not os.path.exists(src.path):
            raise VmtraceError("%s: missing (named in session.json)" % src.path)
        return self.reader(src.path)

    def source(self, name: str) -> Source:
        try:
            return self.sources[name]
        except KeyError:
            raise VmtraceError("no source %r in session %s (has: %s)" % (name, self.dir, ", ".join(self.sources)))

    def markers(self, name: str) -> list:
        """The guest's ``vmtrace-probe``/``vmtrace-order`` trace_marker lines:
        ``(raw_ts, cpu, kind, {key: value})``, in trace order."""
        if name not in self._markers:
            out = []
            for e in self.raw_events(name):
                if getattr(e, "kind", "event") != "event" or event_name(e) != "print":
                    continue
                m = _MARK.search(str(e.fields.get("buf", "")))
                if m and 0 <= int(e.ts) <= NS_MAX:   # a marker off the int64 scale cannot be checked
                    out.append((int(e.ts), int(e.cpu), m.group(1), dict(_KV.findall(m.group(2)))))
            self._markers[name] = out
        return self._markers[name]

    # -- clock maps ----------------------------------------------------------------
    def clock_map(self, name: str) -> ClockMap:
        if name not in self._maps:
            self._maps[name], rep = self._build_map(name)
            if rep is not None:
                self.reports[name] = rep
        return self._maps[name]

    def set_clock_map(self, name: str, cmap: ClockMap) -> None:
        """Override a source's map (e.g. a deliberately wrong one, to test the check)."""
        self.source(name)
        self._maps[name] = cmap

    def _build_map(self, name: str):
        src = self.source(name)
        if src.is_host:
            return IdentityMap(), None
        return build_map(self, name, (src.sync or {}).get("method"))

    def fit_probes(self, name: str) -> list:
        """Probes to fit, with the guest side taken from the probe's trace_marker.

        The marker's timestamp is the trace clock itself, stamped by the kernel inside
        the probe's round trip; the agent's user-space reading (``guest_ns``) is only the
        same clock for mono/mono_raw/boot/tai, and even then is read a few microseconds
        before the marker, which matters when round trips are that short. So markers
        are used when the trace has them, ``guest_ns`` otherwise.
        """
        src = self.source(name)
        if not src.probes:
            raise VmtraceError("guest %s: session has no time probes, cannot map its clock" % name)
        pairs = self.probe_markers(name)
        if pairs:
            return [(p[0], mts, p[2]) for p, mts in pairs]
        if src.clock in EXACT_CLOCKS:
            return [p[:3] for p in src.probes]
        raise VmtraceError("guest %s: clock %r is not readable from user space and no probe "
                           "markers were found in its trace" % (name, src.clock))

    def probe_markers(self, name: str) -> list:
        """Pair each probe with its marker's raw timestamp: [(probe, marker_ts)].

        A probe may carry its seq as a 4th element; otherwise probes are numbered in
        the order they were sent, from the lowest seq seen in the markers.
        """
        src = self.source(name)
        marks = {}
        for ts, _cpu, kind, kv in self.markers(name):
            seq = marker_seq(kv)
            if kind == "probe" and seq is not None:
                marks.setdefault(seq, ts)
        if not marks:
            return []
        first = min(marks)
        out = []
        for i, p in enumerate(src.probes):
            seq = int(p[3]) if len(p) > 3 else first + i
            if seq in marks:
                out.append((p, marks[seq]))
        return out

    # -- merged stream -----------------------------------------------------------------
    def events(self, name: str, cmap: Optional[ClockMap] = None,
               raw: Optional[Iterable[Any]] = None) -> Iterator[MergedEvent]:
        """One source's events with host-clock timestamps, in order (``raw``: a selection
        of its events to map instead of all of them)."""
        cmap = cmap or self.clock_map(name)
        batch: list = []
        for e in (self.raw_events(name) if raw is None else raw):
            batch.append(e)
            if len(batch) >= BATCH:
                yield from _mapped(batch, name, cmap)
                batch = []
        if batch:
            yield from _mapped(batch, name, cmap)

    def merged(self, sources: Optional[Sequence[str]] = None) -> Iterator[MergedEvent]:
        names = list(sources) if sources else list(self.sources)
        for n in names:
            self.source(n)
        # ties: host first, then guests in session order, then stable within a source
        yield from ordered([keyed(self.events(n), _ts, rank) for rank, n in enumerate(names)])


def _mapped(batch: list, name: str, cmap: ClockMap) -> Iterator[MergedEvent]:
    stamps = [int(e.ts) for e in batch]
    if min(stamps) < 0 or max(stamps) > NS_MAX:
        bad = next(t for t in stamps if not 0 <= t <= NS_MAX)
        raise VmtraceError("%s: event timestamp %d is beyond int64 nanoseconds; the trace cannot be "
                           "put on the host's clock" % (name, bad))
    raw = np.array(stamps, dtype=np.int64)
    cpus = np.fromiter((int(e.cpu) for e in batch), dtype=np.int64, count=len(batch))
    host = cmap.to_host(raw, cpus)
    for e, h, r in zip(batch, host.tolist(), raw.tolist()):
        if getattr(e, "kind", "event") == "lost":
            # the kernel dropped events here: keep the mark on the timeline
            yield MergedEvent(h, name, int(e.cpu), -1, "", LOST, {"count": int(e.count)}, "", r)
            continue
        yield MergedEvent(h, name, int(e.cpu), int(e.pid), str(e.comm), event_name(e),
                          dict(e.fields), str(getattr(e, "system", "") or ""), r, e)


LOST = "lost_events"


def _ts(e: MergedEvent) -> int:
    return e.ts


def event_name(e: Any) -> str:
    """The bare event name (``sched_switch``), as trace-cmd prints it.

    vmtrace.api's Event has ``name`` (bare) and ``event`` (``system:name``); records
    made elsewhere may only have ``event``.
    """
    if getattr(e, "kind", "event") == "lost":
        return LOST
    n = getattr(e, "name", None) or getattr(e, "event", "") or ""
    return str(n).rpartition(":")[2]


def _load_session_json(path: str) -> Dict[str, Any]:
    from vmtrace.protocol import ProtocolError, loads

    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_SESSION_JSON + 1)
    except FileNotFoundError:
        raise VmtraceError("%s: no session.json (not a vmtrace session directory)" % os.path.dirname(path)) from None
    except OSError as exc:
        raise VmtraceError("%s: unreadable: %s" % (path, exc.strerror)) from None
    if len(raw) > MAX_SESSION_JSON:
        raise VmtraceError("%s: larger than %d bytes; not a session.json" % (path, MAX_SESSION_JSON))
    try:
        meta = loads(raw, "session.json")
    except ProtocolError as exc:
        raise VmtraceError("%s: unreadable: %s" % (path, exc.what)) from None
    if not isinstance(meta, dict) or meta.get("layout") != "vmtrace-session":
        raise VmtraceError("%s: not a vmtrace-session layout" % path)
    return meta


def _guest_source(meta_path: str, name: str, g: Dict[str, Any], path: str) -> Source:
    """One guest's entry of session.json, every field the merge uses checked."""
    def bad(what: str, value: Any) -> VmtraceError:
        return VmtraceError("%s: guest %s: %s %s" % (meta_path, name, what, short(value)))

    clock = g.get("clock") or ""
    if clock and clock_name(clock) is None:
        raise bad("clock", clock)
    cpus = g.get("cpus") or 0
    if not is_int(cpus, 0, MAX_CPUS):
        raise bad("cpus", cpus)
    probes = g.get("probes") or []
    if not isinstance(probes, list):
        raise bad("probes", probes)
    for i, p in enumerate(probes):
        if not (isinstance(p, list) and len(p) in (3, 4) and all(is_int(v, 0, NS_MAX) for v in p[:3])
                and (len(p) == 3 or is_int(p[3], -NS_MAX, NS_MAX)) and p[0] <= p[2]):
            raise bad("probe %d is not [host_send_ns, guest_ns, host_recv_ns, seq] of int64 values:" % i, p)
    orders = g.get("orders") or []
    if not isinstance(orders, list):
        raise bad("orders", orders)
    for i, o in enumerate(orders):
        if not (isinstance(o, list) and 3 <= len(o) <= 4 and isinstance(o[0], str) and len(o[0]) <= 16
                and is_int(o[1], 0, NS_MAX) and (o[2] is None or is_int(o[2], 0, NS_MAX))
                and (len(o) == 3 or o[3] is None or is_int(o[3], -NS_MAX, NS_MAX))):
            raise bad("order %d is not [kind, host_send_ns, host_ack_ns, seq]:" % i, o)
    sync = g.get("sync")
    if sync is not None and not isinstance(sync, dict):
        raise bad("sync", sync)
    stats = g.get("stats") if isinstance(g.get("stats"), dict) else {}
    return Source(name, path, clock, cpus=cpus, probes=list(probes), orders=list(orders), sync=sync, stats=stats)


def open_session(directory: str, reader: Optional[Reader] = None) -> Session:
    return Session(directory, reader)


class SessionSource:
    """A recording session as a :mod:`vmtrace.source` Source: host and guests on the
    host's clock, selectable like a single trace (``--events``, ``--cpu``, ``--start``,
    ``--end``, ``--stats``, and ``--source`` to pick members).

    Each member trace is opened once, when first needed, and closed with the session.
    Times of a selection are on the host's clock (``CLOCK_MONOTONIC`` ns).
    """

    kind = "session"

    def __init__(self, directory: str, *, keep_going: bool = False, reader: Optional[Reader] = None):
        self.name = os.fspath(directory)
        self.keep_going = keep_going
        self._traces: Dict[str, Any] = {}
        self.session = Session(self.name, reader or self._read)
        host = self.session.meta.get("host")
        self.clock = "host %s" % (clock_name(host.get("clock")) or "mono") if isinstance(host, dict) else "host mono"
        self.identity = ("session", os.path.basename(os.path.abspath(self.name)))

    # -- members --------------------------------------------------------------------------
    def _read(self, path: str) -> Iterable[Any]:
        return self._trace_at(path).events()

    def _trace_at(self, path: str) -> Any:
        trace = self._traces.get(path)
        if trace is None:
            from vmtrace.api import open as api_open
            trace = self._traces[path] = api_open(path, keep_going=self.keep_going)
        return trace

    def source_names(self) -> List[str]:
        return list(self.session.sources)

    def member(self, name: str) -> Any:
        """The trace of source ``name`` (``host`` or a guest)."""
        src = self.session.source(name)
        if not os.path.exists(src.path):
            raise VmtraceError("%s: missing (named in session.json)" % src.path)
        return self._trace_at(src.path)

    def members(self) -> List[Any]:
        return [self.member(n) for n in self.session.sources]

    def close(self) -> None:
        for t in self._traces.values():
            t.close()
        self._traces = {}

    def __enter__(self) -> "SessionSource":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # -- selection ------------------------------------------------------------------------
    def _names(self, sources: Optional[Sequence[str]]) -> List[str]:
        if sources is None:
            return self.source_names()
        return [n for n in self.source_names() if n in sources]

    def check_selection(self, *, events: Optional[Sequence[str]] = None, cpus: Any = None,
                        sources: Optional[Sequence[str]] = None, start: Any = None, end: Any = None) -> None:
        """Refuse a selection that names nothing in the session (one line, exit 2)."""
        if sources is not None:
            unknown = [s for s in sources if s not in self.session.sources]
            if unknown:
                raise VmtraceError("%s: no source named %s (has: %s)" % (
                    self.name, ", ".join(unknown), ", ".join(self.source_names())))
        if events and not any(self.member(n).catalog.match(list(events)) for n in self._names(sources)):
            raise VmtraceError("%s: no event of any source matches --events %r" % (self.name, ",".join(events)))

    def events(self, *, events: Optional[Sequence[str]] = None, cpus: Optional[Iterable[int]] = None,
               sources: Optional[Sequence[str]] = None, start: Any = None, end: Any = None) -> Iterator[MergedEvent]:
        """Every selected event of every selected source on the host's clock, in time
        order, tagged by source (ties: host first, then guests in session order)."""
        s, e = _ns(start), _ns(end)
        streams = []
        for rank, n in enumerate(self._names(sources)):
            raw = self.member(n).events(cpus=cpus, events=events)
            streams.append(keyed(_window(self.session.events(n, raw=raw), s, e), _ts, rank))
        return ordered(streams)

    def table(self, **selection: Any) -> Any:
        """The selected events as a pyarrow Table: ts (host clock), source, cpu, pid,
        comm, event, in the order of :meth:`events`."""
        import pyarrow as pa

        cols: Dict[str, list] = {k: [] for k in ("ts", "source", "cpu", "pid", "comm", "event")}
        for ev in self.events(**selection):
            if ev.event == LOST:
                continue
            for k, v in zip(cols, (ev.ts, ev.source, ev.cpu, ev.pid, ev.comm,
                                   "%s:%s" % (ev.system, ev.event) if ev.system else ev.event)):
                cols[k].append(v)
        schema = pa.schema([("ts", pa.int64()), ("source", pa.string()), ("cpu", pa.uint16()),
                            ("pid", pa.int32()), ("comm", pa.string()), ("event", pa.string())])
        return pa.table(cols, schema=schema)

    def stats(self, **selection: Any) -> Dict[str, Any]:
        """Totals and each source's own statistics (:meth:`vmtrace.api.Trace.stats`) of the
        selection. A time window is on the host's clock, so with one each source's
        events are counted through the merge; without, from its columns."""
        names = self._names(selection.get("sources"))
        if selection.get("start") is None and selection.get("end") is None:
            per = {n: self.member(n).stats(cpus=selection.get("cpus"), events=selection.get("events"))
                   for n in names}
        else:
            per = {n: _empty_stats() for n in names}
            for ev in self.events(**selection):
                st = per[ev.source]
                cpu = st["cpus"].setdefault(ev.cpu, {"events": 0, "pages": 0, "lost": 0, "lost_unknown": 0,
                                                     "problems": 0, "first_ts": None, "last_ts": None})
                if ev.event == LOST:
                    count = int(ev.fields.get("count", -1))
                    key = "lost" if count >= 0 else "lost_unknown"
                    cpu[key] += max(count, 1) if count >= 0 else 1
                    st[key] += max(count, 1) if count >= 0 else 1
                    continue
                cpu["events"] += 1
                st["events"] += 1
                cpu["first_ts"] = cpu["first_ts"] if cpu["first_ts"] is not None else ev.raw_ts
                cpu["last_ts"] = ev.raw_ts
                name = "%s:%s" % (ev.system, ev.event) if ev.system else ev.event
                st["per_event"][name] = st["per_event"].get(name, 0) + 1
        return {"events": sum(p["events"] for p in per.values()),
                "lost": sum(p["lost"] for p in per.values()),
                "lost_unknown": sum(p["lost_unknown"] for p in per.values()),
                "sources": per}

    def text_blocks(self, **selection: Any) -> Iterator[bytes]:
        """Every source's lines on the host's clock, tagged with the source."""
        from vmtrace.text import blocks
        return blocks(session_lines(self, self.events(**selection)))


def _empty_stats() -> Dict[str, Any]:
    return {"events": 0, "lost": 0, "lost_unknown": 0, "cpus": {}, "per_event": {}}


def _ns(t: Any) -> Optional[int]:
    if t is None:
        return None
    return int(round(t * 1e9)) if isinstance(t, float) else int(t)


def _window(events: Iterator[MergedEvent], start: Optional[int], end: Optional[int]) -> Iterator[MergedEvent]:
    """Events of one source within [start, end] on the host's clock; the mapped stream
    is in time order, so it stops at the first event past ``end``."""
    for ev in events:
        if end is not None and ev.ts > end:
            return
        if start is None or ev.ts >= start:
            yield ev


def merged_events(session_dir: "str | Session", *, sources: Optional[Sequence[str]] = None,
                  reader: Optional[Reader] = None) -> Iterator[MergedEvent]:
    """Every event of the session on the host's clock, in time order, tagged by source."""
    s = session_dir if isinstance(session_dir, Session) else Session(session_dir, reader)
    return s.merged(sources)


def is_session_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(os.fspath(path), "session.json"))


def _fmt_fields(fields: dict) -> str:
    return " ".join("%s=%s" % (k, v) for k, v in fields.items())


def format_line(ev: MergedEvent, width: int = 8) -> str:
    """One text line, ``trace-cmd report``-like, with the source in front:
    ``  guest1: comm-pid [001] 12.345678901: sched_switch: prev_comm=...``"""
    sec, ns = divmod(int(ev.ts), 1_000_000_000)
    return "%*s: %16s-%-7d [%03d] %d.%09d: %-20s %s" % (
        width, ev.source, ev.comm, ev.pid, ev.cpu, sec, ns, ev.event + ":", _fmt_fields(ev.fields))


def to_json(ev: MergedEvent) -> dict:
    """The ``--format jsonl`` record: ts in host ns, source ``host`` or the guest name."""
    name = "%s:%s" % (ev.system, ev.event) if ev.system else ev.event
    return {"ts": int(ev.ts), "source": ev.source, "cpu": ev.cpu, "pid": ev.pid, "comm": ev.comm,
            "event": name, "fields": {k: _jsonable(v) for k, v in ev.fields.items()}}


def _jsonable(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def session_lines(session: Any, merged: Iterator[Any]) -> Iterator[str]:
    """``SOURCE: comm-pid [cpu] sec.nsec: event: text`` for merged session events, each
    rendered by its own source's renderer (event formats, cmdlines and kallsyms differ
    between guest and host); only the timestamp is the mapped one, with nanoseconds,
    since mapped guest times are not on a microsecond grid."""
    from vmtrace.format.render import TextRenderer, event_name_column

    width = max([len(n) for n in session.source_names()] + [4])
    renderers: Dict[str, Any] = {}
    for ev in merged:
        sec, ns = divmod(int(ev.ts), 1_000_000_000)
        if ev.event == LOST:
            yield "%*s: CPU:%d [%d EVENTS DROPPED] at %d.%09d" % (
                width, ev.source, ev.cpu, ev.fields.get("count", -1), sec, ns)
            continue
        r = renderers.get(ev.source)
        if r is None:
            trace = session.member(ev.source)
            r = renderers[ev.source] = TextRenderer(trace.metadata, long_size=trace.source.long_size)
        origin = ev.origin
        if origin is not None and getattr(origin, "fmt", None) is not None:
            body = event_name_column(origin.fmt.name) + r.info(origin.fmt, origin.payload)
            comm = r.comm(ev.pid)
        else:
            body = "%s: %s" % (ev.event, " ".join("%s=%s" % kv for kv in ev.fields.items()))
            comm = ev.comm
        yield "%*s: %16s-%-5d [%03d] %d.%09d: %s" % (width, ev.source, comm, ev.pid, ev.cpu, sec, ns, body)
