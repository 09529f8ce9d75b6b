"""Per-CPU scheduling timeline: the model every viewer draws, and the PNG/HTML writers.

A track is one CPU of one source (host CPU N, guest vCPU N). sched_switch tells which
task runs on a CPU from one switch to the next, so the model turns switches into
slices (task, start, end) and keeps the other events as instants. Idle (pid 0,
``swapper/N``) gets no slice: a gap is an idle CPU. The Chrome/Perfetto exporter, the
HTML page and the PNG all draw this one model so they agree.

The model is columnar (numpy arrays). It is built two ways:

* from a trace (a path, or a :class:`vmtrace.api.Trace`): from columns,
  ``event_table("sched:sched_switch")`` for the slices and ``table()`` for the
  instants, without making one Python object per event (:func:`from_trace`);
* from events (vmtrace.session.MergedEvent of a session, with ``source``, or
  vmtrace.api Event objects): one event at a time (:func:`build`); anything with ts,
  cpu, pid, comm, a name and fields works.

:func:`model` picks the right one. Tasks are (pid, comm) pairs; the busiest
:data:`TOP_TASKS` by on-CPU time get their own colour and a legend entry, the rest are
drawn grey as "other".
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from vmtrace.errors import VmtraceError

Track = Tuple[str, int]          # (source, cpu)
IDLE_PIDS = {0}
TOP_TASKS = 8
LOST = "lost_events"
# distinct, colour-blind-friendlier hues for the busiest tasks (Tableau 10 minus grey)
PALETTE = ["#4e79a7", "#f28e2b", "#59a14f", "#b07aa1", "#edc948", "#76b7b2", "#ff9da7",
           "#9c755f"]
OTHER_COLOR = "#a0a4a8"
LOST_COLOR = "#d50000"
LANE_IN = 0.8                    # PNG lane height, inches


@dataclass
class Slice:
    track: Track
    start: int
    end: int
    pid: int
    comm: str


@dataclass
class Instant:
    track: Track
    ts: int
    name: str
    pid: int
    comm: str
    fields: dict


def _i64(a: Any = ()) -> np.ndarray:
    return np.asarray(a, dtype=np.int64)


def _i32(a: Any = ()) -> np.ndarray:
    return np.asarray(a, dtype=np.int32)


class Timeline:
    """Tracks, scheduling slices and instants as columns.

    Slices: ``s_track`` (index into ``tracks``), ``s_start``, ``s_end`` (ns),
    ``s_task`` (index into ``tasks``, a list of (pid, comm)); per track in time order.
    Instants: ``i_track``, ``i_ts``, ``i_name`` (index into ``names``), ``i_pid``,
    ``i_comm`` (index into ``comms``), ``i_count`` (lost events: how many, -1 if unknown) and
    ``i_fields`` (a dict per instant, or None when built from columns).
    """

    def __init__(self) -> None:
        self.tracks: List[Track] = []
        self.sources: Dict[str, Tuple[str, str]] = {}    # source -> (kind, display name)
        self.clock = "host clock"
        self.start = 0
        self.end = 0
        self.events = 0
        self.tasks: List[Tuple[int, str]] = []
        self.s_track, self.s_start, self.s_end, self.s_task = _i32(), _i64(), _i64(), _i32()
        self.names: List[str] = []
        self.comms: List[str] = []
        self.i_track, self.i_ts, self.i_name = _i32(), _i64(), _i32()
        self.i_pid, self.i_comm, self.i_count = _i32(), _i32(), _i64()
        self.i_fields: Optional[List[dict]] = None
        self.instants_total = 0          # before any cap
        self._slices: Optional[List[Slice]] = None
        self._instants: Optional[List[Instant]] = None

    # -- labels ------------------------------------------------------------------------
    def kind(self, source: str) -> str:
        return self.sources.get(source, _default_identity(source))[0]

    def track_label(self, t: Track) -> str:
        source, cpu = t
        kind, name = self.sources.get(source, _default_identity(source))
        if kind == "host":
            return "host CPU %d" % cpu if name == "host" else "host %s CPU %d" % (name, cpu)
        if kind == "guest":
            return "guest %s vCPU %d" % (name, cpu)
        if kind == "vcpu-thread":
            return "%s vCPU %d: host thread" % (name, cpu) if cpu >= 0 else "%s vCPUs: host thread" % name
        return "%s CPU %d" % (name, cpu)

    # -- object views (tests, the Chrome exporter) -----------------------------------
    @property
    def slices(self) -> List[Slice]:
        if self._slices is None:
            self._slices = [Slice(self.tracks[t], s, e, self.tasks[k][0], self.tasks[k][1])
                            for t, s, e, k in zip(self.s_track.tolist(), self.s_start.tolist(),
                                                  self.s_end.tolist(), self.s_task.tolist())]
        return self._slices

    @property
    def instants(self) -> List[Instant]:
        if self._instants is None:
            out = []
            fl = self.i_fields
            lost = self.names.index(LOST) if LOST in self.names else -1
            for j, (t, ts, n, p, c, k) in enumerate(zip(
                    self.i_track.tolist(), self.i_ts.tolist(), self.i_name.tolist(),
                    self.i_pid.tolist(), self.i_comm.tolist(), self.i_count.tolist())):
                f = fl[j] if fl is not None else ({"count": k} if n == lost else {})
                out.append(Instant(self.tracks[t], ts, self.names[n], p, self.comms[c], f))
            self._instants = out
        return self._instants

    # -- tasks -------------------------------------------------------------------------
    def task_time(self) -> np.ndarray:
        """On-CPU ns per task (index into ``tasks``)."""
        return np.bincount(self.s_task, weights=(self.s_end - self.s_start).astype(np.float64),
                           minlength=len(self.tasks))

    def top_tasks(self, n: int = TOP_TASKS) -> List[int]:
        t = self.task_time()
        order = np.argsort(-t, kind="stable")
        return [int(k) for k in order[:n] if t[k] > 0]

    def task_colors(self, n: int = TOP_TASKS) -> List[str]:
        """A colour per task: the busiest ``n`` get the palette, the rest grey."""
        cols = [OTHER_COLOR] * len(self.tasks)
        for i, k in enumerate(self.top_tasks(n)):
            cols[k] = PALETTE[i % len(PALETTE)]
        return cols

    def legend(self, n: int = TOP_TASKS) -> List[Tuple[str, str, int]]:
        """(label, colour, on-CPU ns): the busiest tasks, then "other" if any."""
        t = self.task_time()
        top = self.top_tasks(n)
        out = [("%s-%d" % (self.tasks[k][1], self.tasks[k][0]), PALETTE[i % len(PALETTE)], int(t[k]))
               for i, k in enumerate(top)]
        rest = len(self.tasks) - len(top)
        if rest > 0:
            out.append(("other (%d task%s)" % (rest, "" if rest == 1 else "s"), OTHER_COLOR,
                        int(t.sum() - sum(x[2] for x in out))))
        return out

    def busy(self) -> List[float]:
        """Fraction of each track's span (the whole timeline) that a task ran."""
        span = max(self.end - self.start, 1)
        ns = np.bincount(self.s_track, weights=(self.s_end - self.s_start).astype(np.float64),
                         minlength=len(self.tracks))
        return [float(x) / span for x in ns]

    def lost_mask(self) -> np.ndarray:
        """Which instants are lost-events markers."""
        if LOST not in self.names:
            return np.zeros(len(self.i_ts), bool)
        return self.i_name == self.names.index(LOST)

    def lost(self) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(track, ts, count) of the lost-events markers (count -1: unknown)."""
        m = self.lost_mask()
        return self.i_track[m], self.i_ts[m], self.i_count[m]


def _default_identity(source: str) -> Tuple[str, str]:
    if source == "host":
        return ("host", "host")
    if source == "trace":
        return ("trace", "trace")
    return ("guest", source)


def _order_tracks(tl: Timeline, tracks: Iterable[Track]) -> List[Track]:
    rank = {"host": 0, "trace": 1, "vcpu-thread": 2, "guest": 3}
    return sorted(tracks, key=lambda t: (rank.get(tl.kind(t[0]), 3), t[0], t[1]))


def _name(e: Any) -> str:
    if getattr(e, "kind", "event") == "lost":
        return LOST
    n = getattr(e, "name", None) or getattr(e, "event", "") or ""
    return str(n).rpartition(":")[2]


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return v.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(v)


def _index(table: Dict[Any, int], key: Any) -> int:
    i = table.get(key)
    if i is None:
        i = table[key] = len(table)
    return i


def _finish(tl: Timeline, tracks: List[Track], s_cols: Tuple[list, list, list, list],
            task_ix: Dict[Tuple[int, str], int]) -> None:
    """Reorder tracks (host first, then guests) and slices to match."""
    order = _order_tracks(tl, tracks)
    remap = np.zeros(max(len(tracks), 1), np.int32)
    for new, t in enumerate(order):
        remap[tracks.index(t)] = new
    tl.tracks = order
    tl.tasks = [k for k, _ in sorted(task_ix.items(), key=lambda kv: kv[1])]
    st, ss, se, sk = s_cols
    tr = remap[_i32(st)] if len(st) else _i32()
    ss, se, sk = _i64(ss), _i64(se), _i32(sk)
    o = np.lexsort((ss, tr)) if len(tr) else _i64()
    tl.s_track, tl.s_start, tl.s_end, tl.s_task = tr[o], ss[o], se[o], sk[o]
    if len(tl.i_track):
        tl.i_track = remap[tl.i_track]


def build(events: Iterable[Any], *, max_instants: Optional[int] = None,
          source: Optional[str] = None, kind: Optional[str] = None,
          fields: bool = True) -> Timeline:
    """Turn time-ordered events into tracks, scheduling slices and instants, one event at
    a time (the path for merged sessions). ``source``/``kind`` name a single trace's
    events, which carry no source of their own. Lost-events markers are kept even past
    ``max_instants``. ``fields=False`` keeps no per-instant field dicts (the views
    need none)."""
    tl = Timeline()
    if source is not None:
        tl.sources[source] = (kind or "trace", source)
        tl.clock = "trace clock"
    running: Dict[int, Tuple[int, int, str]] = {}     # track -> (start, pid, comm)
    first: Dict[int, int] = {}
    last: Dict[int, int] = {}
    track_ix: Dict[Track, int] = {}
    task_ix: Dict[Tuple[int, str], int] = {}
    name_ix: Dict[str, int] = {}
    comm_ix: Dict[str, int] = {}
    st: list = []
    ss: list = []
    se: list = []
    sk: list = []
    it: list = []
    its: list = []
    iname: list = []
    ipid: list = []
    icomm: list = []
    icount: list = []
    ifields: list = []
    end = 0
    n = 0
    default_source = source or "trace"
    for e in events:
        ts = int(e.ts)
        trk = (str(getattr(e, "source", default_source)), int(e.cpu))
        tr = track_ix.get(trk)
        if tr is None:
            tr = track_ix[trk] = len(track_ix)
            first[tr] = ts
        last[tr] = ts
        if n == 0:
            tl.start = ts
        if ts > end:
            end = ts
        n += 1
        name = _name(e)
        if name == "sched_switch":
            f = e.fields
            try:
                prev_pid, prev_comm = int(f["prev_pid"]), _text(f["prev_comm"])
                next_pid, next_comm = int(f["next_pid"]), _text(f["next_comm"])
            except (KeyError, TypeError, ValueError):
                raise VmtraceError("sched_switch at %d lacks prev/next pid and comm fields" % ts)
            cur = running.get(tr)
            if cur is None:
                cur = (first[tr], prev_pid, prev_comm)     # it ran since the track began
            if cur[1] not in IDLE_PIDS and ts > cur[0]:
                st.append(tr), ss.append(cur[0]), se.append(ts)
                sk.append(_index(task_ix, (cur[1], cur[2])))
            running[tr] = (ts, next_pid, next_comm)
            continue
        tl.instants_total += 1
        is_lost = name == LOST
        if not is_lost and max_instants is not None and len(it) >= max_instants:
            continue
        count = -1
        if is_lost:
            c = getattr(e, "count", None)
            if not isinstance(c, int):           # a MergedEvent (a tuple: .count is a method)
                c = (getattr(e, "fields", None) or {}).get("count", -1)
            count = int(c)
        it.append(tr), its.append(ts), iname.append(_index(name_ix, name))
        ipid.append(int(getattr(e, "pid", -1)))
        icomm.append(_index(comm_ix, str(getattr(e, "comm", "") or "")))
        icount.append(count)
        if fields:
            ifields.append({"count": count} if is_lost else dict(e.fields))
    for tr, (start, pid, comm) in running.items():
        if pid not in IDLE_PIDS and last[tr] > start:
            st.append(tr), ss.append(start), se.append(last[tr])
            sk.append(_index(task_ix, (pid, comm)))
    tl.end, tl.events = end, n
    tl.names = list(name_ix)
    tl.comms = list(comm_ix)
    tl.i_track, tl.i_ts, tl.i_name = _i32(it), _i64(its), _i32(iname)
    tl.i_pid, tl.i_comm, tl.i_count = _i32(ipid), _i32(icomm), _i64(icount)
    tl.i_fields = ifields if fields else None
    _finish(tl, list(track_ix), (st, ss, se, sk), task_ix)
    return tl


def from_trace(trace: Any) -> Timeline:
    """The model of one trace from columns (no Python object per event)."""
    kind, name = trace.identity
    tl = Timeline()
    tl.sources[name] = (kind, name)
    clock = (getattr(getattr(trace, "source", None), "options", None) or {}).get("clock")
    tl.clock = "trace clock %s" % clock if clock else "trace clock"
    allev = trace.table()
    ts = allev.column("ts").to_numpy().astype(np.int64)
    cpu = allev.column("cpu").to_numpy().astype(np.int64)
    lost_cpu, lost_ts, lost_n = [], [], []
    off = int(getattr(trace, "ts_offset", 0) or 0)
    for c in trace.cpus():
        for b in trace.batches(c):
            for m in b.lost:
                lost_cpu.append(c), lost_ts.append(int(m.ts) + off), lost_n.append(int(m.count))
    tl.events = len(ts) + len(lost_ts)
    if tl.events == 0:
        return tl
    all_ts = np.concatenate([ts, _i64(lost_ts)])
    all_cpu = np.concatenate([cpu, _i64(lost_cpu)])
    tl.start, tl.end = int(all_ts.min()), int(all_ts.max())
    cpus = sorted(set(np.unique(all_cpu).tolist()))
    tracks = [(name, c) for c in cpus]
    cix = {c: i for i, c in enumerate(cpus)}
    first = {c: int(all_ts[all_cpu == c].min()) for c in cpus}
    last = {c: int(all_ts[all_cpu == c].max()) for c in cpus}

    # instants: everything but sched_switch, and the lost markers
    ev = allev.column("event").combine_chunks() if allev.num_rows else None
    names: List[str] = []
    if ev is not None and len(ev):
        dict_names = [str(x).rpartition(":")[2] for x in ev.dictionary.to_pylist()]
        codes = ev.indices.to_numpy(zero_copy_only=False)
        keep = np.ones(len(codes), bool)
        if "sched_switch" in dict_names:
            keep = codes != dict_names.index("sched_switch")
        comm = allev.column("comm").combine_chunks()
        comms = [str(x) for x in comm.dictionary.to_pylist()]
        i_comm = comm.indices.to_numpy(zero_copy_only=False)[keep]
        i_name = codes[keep]
        names = dict_names
        i_ts, i_cpu = ts[keep], cpu[keep]
        i_pid = allev.column("pid").to_numpy()[keep]
    else:
        comms, i_comm, i_name, i_ts, i_cpu, i_pid = [], _i32(), _i32(), _i64(), _i64(), _i32()
    i_count = np.full(len(i_ts), -1, np.int64)
    if lost_ts:
        if LOST not in names:
            names.append(LOST)
        if "" not in comms:
            comms.append("")
        i_ts = np.concatenate([i_ts, _i64(lost_ts)])
        i_cpu = np.concatenate([i_cpu, _i64(lost_cpu)])
        i_name = np.concatenate([i_name, np.full(len(lost_ts), names.index(LOST))])
        i_pid = np.concatenate([i_pid, np.full(len(lost_ts), -1)])
        i_comm = np.concatenate([i_comm, np.full(len(lost_ts), comms.index(""))])
        i_count = np.concatenate([i_count, _i64(lost_n)])
    # time order, ties by CPU, a lost marker before the event it precedes (as events() does)
    o = np.lexsort((np.arange(len(i_ts)), i_name != names.index(LOST) if lost_ts else i_count, i_cpu, i_ts))
    tl.names, tl.comms = names, comms
    tl.i_track = _i32([cix[c] for c in i_cpu.tolist()])[o] if len(i_cpu) else _i32()
    tl.i_ts, tl.i_name, tl.i_pid = i_ts[o], _i32(i_name)[o], _i32(i_pid)[o]
    tl.i_comm, tl.i_count = _i32(i_comm)[o], i_count[o]
    tl.instants_total = len(tl.i_ts)

    # slices: from each switch to the next on the same CPU, the task switched in
    task_ix: Dict[Tuple[int, str], int] = {}
    cols: Tuple[list, list, list, list] = ([], [], [], [])
    if trace.catalog.by_name("sched:sched_switch") is not None:
        sw = trace.event_table("sched:sched_switch")
        s_ts = sw.column("ts").to_numpy().astype(np.int64)
        s_cpu = sw.column("cpu").to_numpy().astype(np.int64)
        prev_pid = sw.column("prev_pid").to_numpy()
        next_pid = sw.column("next_pid").to_numpy()
        prev_comm = sw.column("prev_comm").to_numpy(zero_copy_only=False)
        next_comm = sw.column("next_comm").to_numpy(zero_copy_only=False)
        parts_t, parts_s, parts_e, parts_k = [], [], [], []
        for c in np.unique(s_cpu).tolist():
            idx = np.nonzero(s_cpu == c)[0]
            t = s_ts[idx]
            # slice j runs from start[j] to end[j] with task (pid[j], comm[j])
            start = np.concatenate([[first[c]], t])
            end = np.concatenate([t, [last[c]]])
            pid = np.concatenate([[prev_pid[idx[0]]], next_pid[idx]])
            cm = np.concatenate([[prev_comm[idx[0]]], next_comm[idx]])
            ok = (end > start) & ~np.isin(pid, list(IDLE_PIDS))
            ks = [_index(task_ix, (p, str(n))) for p, n in zip(pid[ok].tolist(), cm[ok].tolist())]
            parts_t.append(np.full(int(ok.sum()), cix[c], np.int32))
            parts_s.append(start[ok]), parts_e.append(end[ok]), parts_k.append(_i32(ks))
        if parts_t:
            cols = (np.concatenate(parts_t), np.concatenate(parts_s), np.concatenate(parts_e),
                    np.concatenate(parts_k))
    _finish(tl, tracks, cols, task_ix)
    return tl


def model(x: Any, *, max_instants: Optional[int] = None, fields: bool = False,
          selection: Any = None) -> Timeline:
    """The timeline of a path, a Source (:mod:`vmtrace.source`) or events.

    A whole single trace is read from columns unless ``fields`` asks for every
    instant's fields (the Chrome exporter), which needs the per-event path; a session,
    a selection, or plain events go event by event."""
    from vmtrace.source import is_source, opened
    if isinstance(x, (str, os.PathLike)):
        with opened(x) as src:
            return model(src, max_instants=max_instants, fields=fields, selection=selection)
    if not is_source(x):
        return build(x, max_instants=max_instants, fields=fields)
    sel = selection.kwargs() if selection is not None else {}
    if x.kind == "session":
        tl = build(x.events(**sel), max_instants=max_instants, fields=fields)
        add_vcpu_tracks(tl, x.session)
        return tl
    if not fields and (selection is None or selection.everything):
        return from_trace(x)
    kind, name = x.identity
    tl = build(x.events(**sel), max_instants=max_instants, source=name, kind=kind, fields=fields)
    clock = (x.source.options or {}).get("clock")
    tl.clock = "trace clock %s" % clock if clock else "trace clock"
    return tl


STEAL_COMM = "steal (runnable, not running)"


def add_vcpu_tracks(tl: Timeline, session: Any) -> None:
    """Per guest recorded with the host's vCPU-thread record (clocksync/steal.py), one
    track per vCPU host thread above the guest's vCPUs: a slice ``vCPU running`` while
    the thread ran, ``steal (ran: TASK)`` while it was runnable but another host task
    had the CPU (``steal (waking)`` after a wake-up), nothing while it slept."""
    from vmtrace.clocksync import steal as st

    new: List[Tuple[Track, int, int, Tuple[int, str]]] = []
    for name in session.guests:
        if "vcpu_threads" not in ((session.source(name).sync) or {}):
            continue
        try:
            cpu2tid, by_tid = st.session_states(session, name, tl.start, tl.end)
        except VmtraceError:
            continue
        src = name + "/vcpu-threads"
        tl.sources[src] = ("vcpu-thread", name)
        shared = len(set(cpu2tid.values())) < len(cpu2tid)
        for cpu, tid in sorted(cpu2tid.items()):
            trk = (src, -1 if shared else cpu)
            for sp in by_tid[tid].spans:
                if sp.state == "running":
                    task = (tid, "vCPU running")
                elif sp.state in st.STEAL_STATES:
                    # one task, so steal has one colour; who ran instead is on the host
                    # CPU tracks at the same time, and in `vmtrace report --steal`
                    task = (-1, STEAL_COMM)
                else:
                    continue
                new.append((trk, sp.start, sp.end, task))
            if shared:
                break
    if not new:
        return
    tracks = list(tl.tracks)
    task_ix = {t: i for i, t in enumerate(tl.tasks)}
    st_, ss, se, sk = tl.s_track.tolist(), tl.s_start.tolist(), tl.s_end.tolist(), tl.s_task.tolist()
    for trk, a, b, task in new:
        if trk not in tracks:
            tracks.append(trk)
        st_.append(tracks.index(trk)), ss.append(a), se.append(b), sk.append(_index(task_ix, task))
    _finish(tl, tracks, (st_, ss, se, sk), task_ix)


def color_of(comm: str) -> str:
    """A stable colour per task name (kept for callers; the views use task_colors)."""
    h = 2166136261
    for ch in comm.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    hue = h % 360
    return "hsl(%d,62%%,52%%)" % hue


# -- PNG -------------------------------------------------------------------------------
def _occupancy(starts: np.ndarray, ends: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Busy ns inside each bin [edges[i], edges[i+1]) for non-overlapping sorted slices."""
    if not len(starts):
        return np.zeros(len(edges) - 1)
    dur = (ends - starts).astype(np.float64)
    cum = np.concatenate([[0.0], np.cumsum(dur)])
    k = np.searchsorted(starts, edges, side="right") - 1          # last slice starting <= edge
    inside = np.where(k >= 0, np.minimum(edges - starts[np.maximum(k, 0)], dur[np.maximum(k, 0)]), 0)
    busy_to = np.where(k >= 0, cum[np.maximum(k, 0)] + inside, 0.0)
    return np.diff(busy_to)


def _runs(key: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Start index and length of each run of equal values."""
    if not len(key):
        return _i64(), _i64()
    change = np.nonzero(np.diff(key))[0] + 1
    starts = np.concatenate([[0], change])
    return starts, np.diff(np.concatenate([starts, [len(key)]]))


def _dur(ns: float) -> str:
    if ns >= 1e9:
        return "%.2f s" % (ns / 1e9)
    if ns >= 1e7:
        return "%.0f ms" % (ns / 1e6)
    if ns >= 1e6:
        return "%.1f ms" % (ns / 1e6)
    return "%.0f us" % (ns / 1e3)


def write_png(tl: Timeline, png_path: str, *, title: str = "vmtrace: per-CPU scheduling") -> str:
    """Draw the timeline as a PNG with matplotlib (no display needed).

    Slices are binned per pixel column: each column of a lane is filled in the colour
    of the task that ran longest in it, to a height proportional to how busy the CPU
    was, and runs of equal columns are one rectangle. Idle is empty; the strip under
    each lane marks other events (darker: more), red marks lost events."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.collections import PolyCollection
    from matplotlib.colors import to_rgba
    from matplotlib.patches import Patch
    from matplotlib.lines import Line2D

    if not tl.tracks:
        raise VmtraceError("no events to draw")
    n = len(tl.tracks)
    legend = tl.legend()
    lost_tr, lost_ts, lost_n = tl.lost()
    n_leg = len(legend) + (1 if len(lost_ts) else 0) + 1
    leg_rows = -(-n_leg // 5)
    fig_w, dpi = 14.0, 100
    fig, ax = plt.subplots(figsize=(fig_w, 1.3 + LANE_IN * n + 0.28 * leg_rows), dpi=dpi)
    t0 = tl.start
    span = max(tl.end - t0, 1)
    bins = int(fig_w * dpi)                 # at least one bin per pixel of the axes
    edges = t0 + np.linspace(0, span, bins + 1)
    x_ms = (edges - t0) / 1e6
    top = tl.top_tasks()
    cls = np.full(len(tl.tasks), len(top), np.int32)          # class per task: top i, or other
    for i, k in enumerate(top):
        cls[k] = i
    colours = [to_rgba(PALETTE[i % len(PALETTE)]) for i in range(len(top))] + [to_rgba(OTHER_COLOR)]
    verts: list = []
    faces: list = []
    busy = tl.busy()
    bounds = np.searchsorted(tl.s_track, np.arange(n + 1))
    s_cls = cls[tl.s_task] if len(tl.s_task) else _i32()
    for r in range(n):
        y = n - 1 - r
        if r % 2:
            ax.axhspan(y, y + 1, color="#f4f6f8", zorder=0, linewidth=0)
        a, b = bounds[r], bounds[r + 1]
        if b > a:
            occ = np.zeros((len(colours), bins))
            for c in np.unique(s_cls[a:b]).tolist():
                m = s_cls[a:b] == c
                occ[c] = _occupancy(tl.s_start[a:b][m], tl.s_end[a:b][m], edges)
            width = np.diff(edges)
            frac = np.clip(occ.sum(axis=0) / width, 0, 1)
            dom = occ.argmax(axis=0)
            level = np.round(frac * 16).astype(np.int64)           # 1/16 height steps
            key = np.where(level > 0, dom * 32 + level, -1)
            rs, rl = _runs(key)
            for s0, ln in zip(rs.tolist(), rl.tolist()):
                kv = key[s0]
                if kv < 0:
                    continue
                h = 0.72 * (kv % 32) / 16.0
                x0, x1 = x_ms[s0], x_ms[s0 + ln]
                yb = y + 0.2
                verts.append([(x0, yb), (x1, yb), (x1, yb + h), (x0, yb + h)])
                faces.append(colours[kv // 32])
        # other events: a strip under the lane, darker where there are more
        m = tl.i_track == r
        if m.any():
            cnt = np.histogram(tl.i_ts[m], bins=edges)[0]
            shade = np.where(cnt > 0, 0.25 + 0.6 * np.log1p(cnt) / np.log1p(max(cnt.max(), 1)), 0)
            q = np.round(shade * 8).astype(np.int64)
            rs, rl = _runs(q)
            for s0, ln in zip(rs.tolist(), rl.tolist()):
                if q[s0] == 0:
                    continue
                x0, x1 = x_ms[s0], x_ms[s0 + ln]
                verts.append([(x0, y + 0.05), (x1, y + 0.05), (x1, y + 0.16), (x0, y + 0.16)])
                faces.append((0.15, 0.2, 0.25, q[s0] / 8.0))
    ax.add_collection(PolyCollection(verts, facecolors=faces, edgecolors="none", linewidths=0,
                                     antialiaseds=False, zorder=2))
    if len(lost_ts):
        xs = (lost_ts - t0) / 1e6
        ys = np.array([n - 1 - int(r) for r in lost_tr.tolist()], float)
        ax.vlines(xs, ys + 0.05, ys + 0.95, colors=LOST_COLOR, linewidths=1.2, zorder=3)
        ax.scatter(xs, ys + 0.93, marker="v", s=30, c=LOST_COLOR, zorder=4, linewidths=0)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(n)])
    ax.set_yticklabels(["%s\n%.0f%% busy" % (tl.track_label(t), 100 * busy[i])
                        for i, t in enumerate(tl.tracks)], fontsize=9)
    ax.set_ylim(0, n)
    ax.set_xlim(0, span / 1e6)
    ax.set_xlabel("ms since the first event (%s, t0 = %d ns)" % (tl.clock, t0))
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3, zorder=1)
    ax.set_axisbelow(True)
    total = max(sum(x[2] for x in legend), 1)
    handles = [Patch(facecolor=c, label="%s  %s (%.0f%%)" % (lbl, _dur(ns), 100.0 * ns / total))
               for lbl, c, ns in legend]
    handles.append(Patch(facecolor=(0.15, 0.2, 0.25, 0.6), label="other events (%d)" % tl.instants_total))
    if len(lost_ts):
        known = int(lost_n[lost_n > 0].sum())
        handles.append(Line2D([], [], color=LOST_COLOR, marker="v", linewidth=1.2,
                              label="lost events: %d marker%s, %d events%s" % (
                                  len(lost_ts), "" if len(lost_ts) == 1 else "s", known,
                                  " + unknown" if (lost_n < 0).any() else "")))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.5 / (LANE_IN * n)),
              ncol=5, fontsize=8, frameon=False, handlelength=1.2, columnspacing=1.2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path, bbox_inches="tight")
    plt.close(fig)
    return png_path
