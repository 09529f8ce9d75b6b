"""`vmtrace report SESSION_DIR`: host and guests on one timeline, as text, JSON, HTML
or a Perfetto trace (protobuf or Chrome JSON).

Each source keeps its own metadata (event formats, cmdlines, kallsyms differ between
a guest and the host), so every line is rendered by its own source's trace-cmd-style
renderer; only the timestamp is replaced by the host-clock one from the merge. The
timestamp keeps nanoseconds because guest times mapped by the clock fit are not on a
microsecond grid.
"""
from __future__ import annotations

import contextlib
import json
import sys
from typing import Any, Callable, Dict, Iterable, Iterator, Optional, Sequence, TextIO

from vmtrace.merge import LOST, MergedEvent, Session, event_name, to_json


class _Sources:
    """Opens each source's trace once, so its metadata is at hand for rendering."""

    def __init__(self) -> None:
        self.traces: Dict[str, Any] = {}

    def reader(self, path: str):
        from vmtrace.api import open as api_open

        trace = self.traces.get(path)
        if trace is None:
            trace = self.traces[path] = api_open(path)
        return trace.events()

    def close(self) -> None:
        for t in self.traces.values():
            t.close()


@contextlib.contextmanager
def open_merged(session_dir: str, sources: Optional[Sequence[str]] = None):
    """(Session, merged events iterator, _Sources) for a session directory; the
    sources' traces are closed when the block ends."""
    src = _Sources()
    try:
        session = Session(session_dir, src.reader)
        yield session, session.merged(sources), src
    finally:
        src.close()


def text_lines(session_dir: str, *, sources: Optional[Sequence[str]] = None) -> Iterator[str]:
    """One line per event: ``SOURCE: comm-pid [cpu] sec.nsec: event: text``."""
    from vmtrace.format.render import event_name_column

    with open_merged(session_dir, sources) as (session, merged, src):
        width = max([len(n) for n in session.sources] + [4])
        renderers: Dict[str, Any] = {}
        path_of = {name: s.path for name, s in session.sources.items()}
        for ev in merged:
            sec, ns = divmod(int(ev.ts), 1_000_000_000)
            if ev.event == LOST:
                yield "%*s: CPU:%d [%d EVENTS DROPPED] at %d.%09d" % (
                    width, ev.source, ev.cpu, ev.fields.get("count", -1), sec, ns)
                continue
            r = renderers.get(ev.source)
            if r is None:
                from vmtrace.format.render import TextRenderer

                trace = src.traces.get(path_of.get(ev.source, ""))
                r = renderers[ev.source] = TextRenderer(trace.metadata, long_size=trace.source.long_size)
            origin = ev.origin
            if origin is not None and getattr(origin, "fmt", None) is not None:
                body = event_name_column(origin.fmt.name) + r.info(origin.fmt, origin.payload)
                comm = r.comm(ev.pid)
            else:
                body = "%s: %s" % (ev.event, " ".join("%s=%s" % kv for kv in ev.fields.items()))
                comm = ev.comm
            yield "%*s: %16s-%-5d [%03d] %d.%09d: %s" % (width, ev.source, comm, ev.pid, ev.cpu, sec, ns, body)


def write_text(session_dir: str, out: Optional[str] = None) -> None:
    f: TextIO = open(out, "w", encoding="utf-8") if out else sys.stdout
    try:
        buf = []
        for line in text_lines(session_dir):
            buf.append(line)
            if len(buf) >= 4096:
                f.write("\n".join(buf) + "\n")
                buf.clear()
        if buf:
            f.write("\n".join(buf) + "\n")
    finally:
        if out:
            f.close()


def write_jsonl(session_dir: str, out: Optional[str] = None) -> None:
    """``{"ts", "source", "cpu", "pid", "comm", "event", "fields"}``, ts in host ns."""
    with open_merged(session_dir) as (_session, merged, _src):
        f: TextIO = open(out, "w", encoding="utf-8") if out else sys.stdout
        try:
            for ev in merged:
                f.write(json.dumps(to_json(ev)) + "\n")
        finally:
            if out:
                f.close()


def write_html(session_dir: str, out: str) -> str:
    """The session's self-contained timeline page (one track per host CPU and guest vCPU)."""
    from vmtrace.export.html import write_html as _write

    with open_merged(session_dir) as (_session, merged, _src):
        return _write(merged, out, title="vmtrace session %s" % session_dir)


class Tally:
    """Counts what an export consumed, for the one-line summary the CLI prints."""

    def __init__(self) -> None:
        self.events = 0
        self.lost = 0
        self.sources: set = set()

    def watch(self, events: Iterable[Any]) -> Iterator[Any]:
        for e in events:
            if event_name(e) == LOST:
                self.lost += 1
            else:
                self.events += 1
            self.sources.add(getattr(e, "source", ""))
            yield e

    def summary(self, path: str) -> str:
        k = len(self.sources)
        lost = " and %d lost-events marker%s" % (self.lost, "" if self.lost == 1 else "s") if self.lost else ""
        return "wrote %d events%s from %d source%s to %s" % (self.events, lost, k, "" if k == 1 else "s", path)


def write_perfetto(session_dir: str, out: str) -> Tally:
    """The merged session as a Perfetto protobuf trace, one machine per source."""
    from vmtrace.export.perfetto_proto import write_perfetto as _write

    return _export(session_dir, out, _write)


def write_chrome(session_dir: str, out: str) -> Tally:
    """The merged session as Chrome trace JSON (one process per source)."""
    from vmtrace.export.perfetto import write_chrome_json

    return _export(session_dir, out, write_chrome_json)


def _export(session_dir: str, out: str, write: Callable[[Any, str], Any]) -> Tally:
    tally = Tally()
    with open_merged(session_dir) as (_session, merged, _src):
        write(tally.watch(merged), out)
    return tally
