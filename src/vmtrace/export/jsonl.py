"""JSON lines: one object per event, for jq, log pipelines and quick scripts.

Each line: ``{"ts": ns, "cpu": N, "pid": N, "comm": "...", "event": "system:name",
"fields": {...}}``; dropped events become ``{"ts": ns, "cpu": N, "lost": count}``.
For a session every line also names its ``source`` and ``ts`` is on the host's clock
(:func:`vmtrace.session.to_json`)
(count -1 when the kernel did not say how many). Field values are what
:meth:`vmtrace.format.events.EventFormat.decode` returns: ints, strings and lists, so
the output is plain JSON without custom encoders.
"""
from __future__ import annotations

import json
import os
import sys
from typing import IO, Any, Iterable, Optional, Sequence, Union

from vmtrace.export import Export

__all__ = ["write_jsonl", "event_record", "write"]

FORMAT = Export("jsonl", "one JSON object per event (a session: with its source, on the host's clock)")


def event_record(ev: Any) -> dict:
    """The JSON object for one event (or lost-events marker) of ``Trace.events()``."""
    if getattr(ev, "kind", "event") == "lost":
        return {"ts": ev.ts, "cpu": ev.cpu, "lost": ev.count}
    return {"ts": ev.ts, "cpu": ev.cpu, "pid": ev.pid, "comm": ev.comm, "event": ev.event,
            "fields": ev.fields}


def write_jsonl(trace: Any, out: Union[str, os.PathLike, IO[str]], *,
                cpus: Optional[Iterable[int]] = None, events: Optional[Sequence[str]] = None,
                start: Any = None, end: Any = None, buffer: Optional[str] = None,
                sources: Optional[Sequence[str]] = None) -> int:
    """Write the selected events of ``trace`` to ``out`` (path or text file); count them."""
    if isinstance(out, (str, os.PathLike)):
        with open(out, "w", encoding="utf-8") as f:
            return write_jsonl(trace, f, cpus=cpus, events=events, start=start, end=end,
                               buffer=buffer, sources=sources)
    dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
    n = 0
    write = out.write
    for ev in trace.events(cpus=cpus, events=events, start=start, end=end, buffer=buffer, sources=sources):
        write(dumps(event_record(ev)))
        write("\n")
        n += 1
    return n



def write(source: Any, out: Optional[str], selection: Any) -> Optional[str]:
    """The registry's entry: a single trace's records or a session's, to ``out`` or stdout."""
    if source.kind != "session":
        write_jsonl(source, out or sys.stdout, **selection.kwargs())
        return None
    from vmtrace.session import to_json
    f: IO[str] = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        for ev in source.events(**selection.kwargs()):
            f.write(json.dumps(to_json(ev)) + "\n")
    finally:
        if out:
            f.close()
    return None
