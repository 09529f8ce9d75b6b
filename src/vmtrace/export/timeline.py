"""Per-CPU scheduling timeline: the model every viewer draws, and the PNG/HTML writers.

A track is one CPU of one source (host CPU N, guest vCPU N). sched_switch tells which
task runs on a CPU from one switch to the next, so the model turns switches into
slices (task, start, end) and keeps the other events as instants. The Chrome/Perfetto
exporter, the HTML page and the PNG all draw this one model so they agree.

Events may be vmtrace.merge.MergedEvent (with ``source``) or vmtrace.api Event objects
of a single trace (source ``trace``); anything with ts, cpu, pid, comm, a name and
fields works.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

from vmtrace.errors import VmtraceError

Track = Tuple[str, int]          # (source, cpu)
IDLE_PIDS = {0}


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


@dataclass
class Timeline:
    tracks: List[Track] = field(default_factory=list)
    slices: List[Slice] = field(default_factory=list)
    instants: List[Instant] = field(default_factory=list)
    start: int = 0
    end: int = 0
    events: int = 0

    def track_label(self, t: Track) -> str:
        source, cpu = t
        if source in ("host", "trace"):
            return "%s CPU %d" % (source, cpu)
        return "%s vCPU %d" % (source, cpu)


def _name(e: Any) -> str:
    if getattr(e, "kind", "event") == "lost":
        return "lost_events"
    n = getattr(e, "name", None) or getattr(e, "event", "") or ""
    return str(n).rpartition(":")[2]


def _text(v: Any) -> str:
    if isinstance(v, (bytes, bytearray)):
        return v.split(b"\0", 1)[0].decode("utf-8", "replace")
    return str(v)


def build(events: Iterable[Any], *, max_instants: Optional[int] = None) -> Timeline:
    """Turn time-ordered events into tracks, scheduling slices and instants."""
    tl = Timeline()
    running: Dict[Track, Tuple[int, int, str]] = {}     # track -> (start, pid, comm)
    first: Dict[Track, int] = {}
    last: Dict[Track, int] = {}
    tracks = set()
    for e in events:
        ts = int(e.ts)
        tr = (str(getattr(e, "source", "trace")), int(e.cpu))
        if tr not in tracks:
            tracks.add(tr)
            first[tr] = ts
        last[tr] = ts
        if tl.events == 0:
            tl.start = ts
        tl.end = max(tl.end, ts)
        tl.events += 1
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
                tl.slices.append(Slice(tr, cur[0], ts, cur[1], cur[2]))
            running[tr] = (ts, next_pid, next_comm)
        elif max_instants is None or len(tl.instants) < max_instants:
            pid = int(getattr(e, "pid", -1))
            fields = {"count": e.count} if name == "lost_events" else dict(e.fields)
            tl.instants.append(Instant(tr, ts, name, pid, str(getattr(e, "comm", "")), fields))
    for tr, (start, pid, comm) in running.items():
        if pid not in IDLE_PIDS and last[tr] > start:
            tl.slices.append(Slice(tr, start, last[tr], pid, comm))
    tl.tracks = sorted(tracks, key=lambda t: (t[0] not in ("host", "trace"), t[0], t[1]))
    return tl


def events_of(trace_or_events: Any) -> Iterable[Any]:
    """Accept a session directory, a trace path, a Trace, or events."""
    if isinstance(trace_or_events, (str, os.PathLike)):
        path = os.fspath(trace_or_events)
        from vmtrace import merge
        if merge.is_session_dir(path):
            return merge.merged_events(path)
        from vmtrace import open as vopen
        return vopen(path).events()
    if hasattr(trace_or_events, "events") and callable(trace_or_events.events):
        return trace_or_events.events()
    return trace_or_events


def color_of(comm: str) -> str:
    """A stable colour per task name, so a task looks the same on every track."""
    h = 2166136261
    for ch in comm.encode():
        h = ((h ^ ch) * 16777619) & 0xFFFFFFFF
    hue = h % 360
    return "hsl(%d,62%%,52%%)" % hue


def _rgb(comm: str) -> Tuple[float, float, float]:
    import colorsys
    hue = int(color_of(comm).split("(")[1].split(",")[0])
    return colorsys.hls_to_rgb(hue / 360.0, 0.52, 0.62)


def write_png(tl: Timeline, png_path: str, *, title: str = "vmtrace: per-CPU scheduling") -> str:
    """Draw the timeline as a PNG with matplotlib (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not tl.tracks:
        raise VmtraceError("no events to draw")
    n = len(tl.tracks)
    fig, ax = plt.subplots(figsize=(14, 1.0 + 0.45 * n), dpi=100)
    row = {t: i for i, t in enumerate(tl.tracks)}
    by_track: Dict[Track, list] = {}
    for s in tl.slices:
        by_track.setdefault(s.track, []).append(s)
    t0 = tl.start
    for t, ss in by_track.items():
        y = n - 1 - row[t]
        ax.broken_barh([((s.start - t0) / 1e6, max((s.end - s.start) / 1e6, 1e-6)) for s in ss],
                       (y + 0.1, 0.8), facecolors=[_rgb(s.comm) for s in ss], linewidth=0)
    if tl.instants:
        xs = [(i.ts - t0) / 1e6 for i in tl.instants]
        ys = [n - 1 - row[i.track] + 0.5 for i in tl.instants]
        ax.scatter(xs, ys, s=2, c="black", marker="|", linewidths=0.5, alpha=0.5)
    ax.set_yticks([n - 1 - i + 0.5 for i in range(n)])
    ax.set_yticklabels([tl.track_label(t) for t in tl.tracks])
    ax.set_ylim(0, n)
    ax.set_xlim(0, max((tl.end - t0) / 1e6, 1e-3))
    ax.set_xlabel("ms since %d ns (host clock)" % t0)
    ax.set_title(title)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(png_path)), exist_ok=True)
    fig.savefig(png_path)
    plt.close(fig)
    return png_path


def write_timeline(trace_or_events: Any, png_path: Optional[str] = None,
                   html_path: Optional[str] = None, *, title: str = "vmtrace timeline") -> Timeline:
    """Write the per-CPU scheduling timeline as PNG and/or a self-contained HTML page."""
    tl = build(events_of(trace_or_events))
    if png_path:
        write_png(tl, png_path, title=title)
    if html_path:
        from vmtrace.export.html import write_timeline_html
        write_timeline_html(tl, html_path, title=title)
    return tl
