"""Export to the Chrome trace event format (JSON), which the Perfetto UI and
chrome://tracing open.

Mapping: each source (host, each guest) is a "process" and each of its CPUs a "thread",
so the UI shows one track per host CPU and per guest vCPU, grouped by machine.
Scheduling slices (from sched_switch, see :mod:`vmtrace.export.timeline`) are complete
events (``ph: X``) named after the running task; every other event is a thread-scoped
instant (``ph: i``) carrying its fields as ``args``. Timestamps are the host's
CLOCK_MONOTONIC in microseconds with nanosecond decimals, so guests and host line up.

Perfetto's own protobuf format, with ftrace events in their native form (so Perfetto
builds its own scheduling tracks, thread states and per-machine CPUs), is written by
:mod:`vmtrace.export.perfetto`; this JSON remains for chrome://tracing and for
views that want vmtrace's own slices.
"""
from __future__ import annotations

import json
import os
from typing import Any, Dict, Iterator, Optional

from vmtrace.export import Counted, Export, Tally
from vmtrace.export.timeline import Timeline, model


def _us(ns: int) -> float:
    return round(ns / 1000.0, 3)


def _arg(v: Any) -> Any:
    if isinstance(v, (bytes, bytearray)):
        return v.split(b"\0", 1)[0].decode("utf-8", "replace")
    if isinstance(v, (int, float, str, bool)) or v is None:
        return v
    if hasattr(v, "tolist"):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_arg(x) for x in v]
    return str(v)


def trace_events(tl: Timeline) -> Iterator[Dict[str, Any]]:
    """The ``traceEvents`` list, metadata first."""
    pids: Dict[str, int] = {}
    for src, _cpu in tl.tracks:
        pids.setdefault(src, len(pids) + 1)
    for src, pid in pids.items():
        yield {"ph": "M", "name": "process_name", "pid": pid, "tid": 0, "args": {"name": src}}
        yield {"ph": "M", "name": "process_sort_index", "pid": pid, "tid": 0, "args": {"sort_index": pid}}
    for t in tl.tracks:
        yield {"ph": "M", "name": "thread_name", "pid": pids[t[0]], "tid": t[1],
               "args": {"name": tl.track_label(t)}}
        yield {"ph": "M", "name": "thread_sort_index", "pid": pids[t[0]], "tid": t[1],
               "args": {"sort_index": t[1]}}
    for s in tl.slices:
        yield {"ph": "X", "name": s.comm or str(s.pid), "cat": "sched", "pid": pids[s.track[0]],
               "tid": s.track[1], "ts": _us(s.start), "dur": _us(s.end - s.start),
               "args": {"pid": s.pid, "comm": s.comm}}
    for i in tl.instants:
        args = {k: _arg(v) for k, v in i.fields.items()}
        args["pid"] = i.pid
        args["comm"] = i.comm
        yield {"ph": "i", "s": "t", "name": i.name, "cat": "event", "pid": pids[i.track[0]],
               "tid": i.track[1], "ts": _us(i.ts), "args": args}


FORMAT = Export("chrome", "Chrome trace JSON (chrome://tracing, ui.perfetto.dev) with vmtrace's "
                "scheduling slices", needs_file=True)


def write(source: Any, out: str, selection: Any) -> Optional[str]:
    """The registry's entry: the selection of ``source`` as Chrome trace JSON."""
    tally = Tally()
    write_chrome_json(Counted(source, tally), out, selection=selection)
    return tally.summary(out)


def chrome_trace(events: Any) -> dict:
    """The whole Chrome trace as a dict (for small traces and tests)."""
    tl = model(events, fields=True)
    return {"traceEvents": list(trace_events(tl)), "displayTimeUnit": "ns",
            "otherData": {"generator": "vmtrace", "clock": "host CLOCK_MONOTONIC"}}


def write_chrome_json(events: Any, path: str, *, selection: Any = None) -> str:
    """Write a Chrome trace JSON file, streaming the events list to keep memory flat.
    ``events``: a path, a Source, or events."""
    tl = model(events, fields=True, selection=selection)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write('{"displayTimeUnit":"ns","otherData":{"generator":"vmtrace",'
                '"clock":"host CLOCK_MONOTONIC"},"traceEvents":[\n')
        first = True
        for ev in trace_events(tl):
            if not first:
                f.write(",\n")
            f.write(json.dumps(ev, separators=(",", ":")))
            first = False
        f.write("\n]}\n")
    return path
