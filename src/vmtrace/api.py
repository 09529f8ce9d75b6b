"""The Python API: ``vmtrace.open(path)`` and a :class:`Trace` to iterate, tabulate, count.

Everything here streams: a CPU's pages are decoded a chunk at a time
(:func:`vmtrace.format.ringbuffer.iter_batches`), so memory is bounded by the chunk
size times the number of CPUs whatever the trace size. Events of all CPUs are merged by
timestamp the way trace-cmd does it (ties go to the lower CPU), and dropped events
appear in the stream as :class:`LostEvents` where trace-cmd prints ``[EVENTS DROPPED]``.
"""
from __future__ import annotations

import builtins
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from vmtrace.errors import FormatError, VmtraceError
from vmtrace.format.events import EventCatalog, EventFormat
from vmtrace.format.metadata import TraceMetadata
from vmtrace.merge import ordered
from vmtrace.tables import arrow_column, base_schema, column_name, event_schema, sorted_table
from vmtrace.format.ringbuffer import (EventBatch, PageLayout, decode_pages, iter_batches,
                                       layout_from_headers)

__all__ = ["open", "Trace", "Event", "LostEvents"]

Time = Union[int, float, None]


# Page bytes of all CPUs' current chunks together: a merge holds one chunk per CPU, and
# decoding a chunk makes arrays of up to ~3x its size; with 16 CPUs or fewer the chunks
# stay at the full 2048 pages (8 MB) each.
MAX_INFLIGHT = 128 << 20


class Event:
    """One trace event. ``fields`` is decoded on first access (most filters never look)."""

    __slots__ = ("ts", "cpu", "pid", "comm", "fmt", "payload", "_fields", "_keep_going")

    def __init__(self, ts: int, cpu: int, pid: int, comm: str, fmt: Optional[EventFormat],
                 payload: Union[bytes, memoryview], keep_going: bool = False):
        self.ts = ts
        self.cpu = cpu
        self.pid = pid
        self.comm = comm
        self.fmt = fmt
        self.payload = payload
        self._fields: Optional[Dict[str, Any]] = None
        self._keep_going = keep_going

    kind = "event"

    @property
    def system(self) -> str:
        return self.fmt.system if self.fmt else ""

    @property
    def name(self) -> str:
        return self.fmt.name if self.fmt else f"unknown_event_{self.type_id}"

    @property
    def event(self) -> str:
        return f"{self.system}:{self.name}"

    @property
    def type_id(self) -> int:
        return int.from_bytes(bytes(self.payload[:2]), "little" if not self.fmt or
                              self.fmt.endian == "<" else "big")

    @property
    def fields(self) -> Dict[str, Any]:
        if self._fields is None:
            if self.fmt is None:
                self._fields = {}
            else:
                try:
                    self._fields = self.fmt.decode(self.payload)
                except FormatError:
                    if not self._keep_going:
                        raise
                    self._fields = {}
        return self._fields

    def __repr__(self) -> str:
        return (f"Event(ts={self.ts}, cpu={self.cpu}, {self.comm}-{self.pid}, {self.event}, "
                f"{self.fields})")


class LostEvents:
    """Events the kernel dropped on ``cpu`` before the next event (count -1: unknown)."""

    __slots__ = ("ts", "cpu", "count")
    kind = "lost"

    def __init__(self, ts: int, cpu: int, count: int):
        self.ts = ts
        self.cpu = cpu
        self.count = count

    def __repr__(self) -> str:
        return f"LostEvents(cpu={self.cpu}, count={self.count}, ts={self.ts})"

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, LostEvents)
                and (self.ts, self.cpu, self.count) == (other.ts, other.cpu, other.count))


def _ns(t: Time) -> Optional[int]:
    """Times are trace-clock integers (ns for most clocks); a float is taken as seconds."""
    if t is None:
        return None
    if isinstance(t, float):
        return int(round(t * 1e9))
    return int(t)


def open(path: Union[str, os.PathLike], *, keep_going: bool = False) -> "Trace":  # noqa: A001
    """Open a trace.dat file or a raw directory for decoding."""
    from vmtrace.sources import open_source
    return Trace(open_source(path), keep_going=keep_going)


class Trace:
    """A decoded view of one :class:`~vmtrace.format.TraceSource`."""

    def __init__(self, source: Any, *, keep_going: bool = False, chunk_pages: int = 2048):
        self.source = source
        self.keep_going = keep_going
        self.chunk_pages = chunk_pages
        name = getattr(source, "path", "") or "trace"
        self.name = str(name)
        self.layout: PageLayout = _layout(source, self.name)
        endian = source.endian if source.endian in ("<", ">") else (
            "<" if source.endian == "little" else ">")
        self.catalog = EventCatalog.from_texts(source.ftrace_formats, source.event_formats,
                                               long_size=source.long_size, endian=endian,
                                               max_payload=self.layout.data_size)
        clock = (source.options or {}).get("clock")
        self.metadata = TraceMetadata.from_source(source, clock=clock)
        try:
            self.ts_offset = int((source.options or {}).get("offset", "0") or 0, 0)
        except (TypeError, ValueError):
            self.ts_offset = 0
        self._endian = endian
        self._common = _common_layout(self.catalog, endian)
        self.problems: List[Tuple[int, Any]] = []

    # -- the Source interface (vmtrace.source) -----------------------------------------
    @property
    def kind(self) -> str:
        """``trace.dat``, ``raw`` or ``stream``: what was opened."""
        return getattr(self.source, "kind", None) or (
            "raw" if type(self.source).__name__ == "RawDir" else "trace.dat")

    @property
    def clock(self) -> str:
        return str((self.source.options or {}).get("clock") or "local")

    @property
    def identity(self) -> Tuple[str, str]:
        """(role, label): ``("guest", NAME)``, ``("host", "host")`` or ``("trace", HOSTNAME)``;
        see :func:`trace_identity`."""
        return trace_identity(self)

    def members(self) -> List["Trace"]:
        return [self]

    def source_names(self) -> List[str]:
        return [self.identity[1]]

    def _selected(self, sources: Optional[Sequence[str]]) -> bool:
        return sources is None or self.identity[1] in sources

    def check_selection(self, *, events: Optional[Sequence[str]] = None, cpus: Any = None,
                        sources: Optional[Sequence[str]] = None, start: Time = None, end: Time = None) -> None:
        """Refuse a selection that names nothing in this trace (one line, exit 2)."""
        if events and not self.catalog.match(list(events)):
            raise VmtraceError(f"{self.name}: no event matches --events {','.join(events)!r}")
        if sources is not None and not self._selected(sources):
            raise VmtraceError(f"{self.name}: no source named {', '.join(sources)} (this trace is "
                               f"{self.identity[1]!r})")

    def text_blocks(self, *, events: Optional[Sequence[str]] = None, cpus: Optional[Iterable[int]] = None,
                    sources: Optional[Sequence[str]] = None, start: Time = None, end: Time = None,
                    fast: bool = True) -> Iterator[bytes]:
        """What ``trace-cmd report`` prints for this trace, in UTF-8 blocks of lines."""
        from vmtrace.text import trace_blocks
        if not self._selected(sources):
            return iter(())
        return trace_blocks(self, cpus=cpus, events=events, start=_ns(start), end=_ns(end), fast=fast)

    # -- plumbing --------------------------------------------------------------------
    def close(self) -> None:
        self.source.close()

    def __enter__(self) -> "Trace":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def buffers(self) -> List[str]:
        return [b.name for b in self.source.buffers]

    def _buffer(self, name: Optional[str]) -> Any:
        bufs = self.source.buffers
        if name is not None:
            for b in bufs:
                if b.name == name:
                    return b
            raise VmtraceError(f"{self.name}: no buffer named {name!r} "
                               f"(have: {', '.join(repr(b.name) for b in bufs)})")
        for b in bufs:  # the top buffer if it has data, else the first one that does
            if any(c.size for c in b.cpus):
                return b
        if bufs:
            return bufs[0]
        raise VmtraceError(f"{self.name}: no trace data")

    def cpus(self, buffer: Optional[str] = None) -> List[int]:
        return [c.cpu for c in self._buffer(buffer).cpus]

    def _chunk_pages(self, buf: Any) -> int:
        """Pages per chunk so that one chunk of every CPU of ``buf`` fits in
        :data:`MAX_INFLIGHT` (a merge holds all of them at once); a file whose CPUs
        cannot each have one page within it is refused."""
        ps = self.layout.page_size
        n = sum(1 for c in buf.cpus if c.size) or 1
        if n * ps > MAX_INFLIGHT:
            raise FormatError(f"{n} CPUs of {ps}-byte pages need more than {MAX_INFLIGHT} bytes "
                              "to merge", source=self.name)
        return max(1, min(self.chunk_pages, MAX_INFLIGHT // (n * ps)))

    def batches(self, cpu: int, buffer: Optional[str] = None) -> Iterator[EventBatch]:
        """One CPU's events as columnar batches (see docs/internals.md), streamed."""
        buf = self._buffer(buffer)
        for c in buf.cpus:
            if c.cpu != cpu:
                continue
            src = f"{self.name}[{buf.name or 'top'}] cpu{cpu}"
            for batch in self._decode_cpu(c, cpu, src, self._chunk_pages(buf)):
                for p in batch.problems:
                    self.problems.append((cpu, p))
                if self.ts_offset:
                    batch.ts = batch.ts + np.uint64(self.ts_offset % (1 << 64))
                yield batch
            return

    def _decode_cpu(self, c: Any, cpu: int, src: str, chunk_pages: int) -> Iterator[EventBatch]:
        """Decode straight from the source's own chunk buffers (no copy per page)."""
        chunks = getattr(c, "chunks", None)
        if chunks is None:
            yield from iter_batches(c.pages(), self.layout, cpu, source=src,
                                    keep_going=self.keep_going, chunk_pages=chunk_pages)
            return
        consumed = 0
        for chunk in chunks(chunk_pages * self.layout.page_size):
            yield decode_pages(chunk, self.layout, cpu, source=src, base_offset=consumed,
                               keep_going=self.keep_going)
            consumed += len(chunk)

    def _select(self, batch: EventBatch, ids: Optional[np.ndarray], start: Optional[int],
                end: Optional[int]) -> np.ndarray:
        keep = np.ones(len(batch), bool)
        if ids is not None:
            keep &= np.isin(batch.type_id, ids)
        if start is not None:
            keep &= batch.ts >= np.uint64(max(start, 0))
        if end is not None:
            keep &= batch.ts <= np.uint64(max(end, 0))
        return keep

    def _ids(self, events: Optional[Sequence[str]]) -> Optional[np.ndarray]:
        if events is None:
            return None
        if isinstance(events, str):
            events = [events]
        return np.array(self.catalog.match(list(events)), dtype=np.uint16)

    def _pids(self, batch: EventBatch) -> np.ndarray:
        off, size = self._common.get("common_pid", (4, 4))
        if len(batch) == 0:
            return np.zeros(0, np.int32)
        raw = np.frombuffer(batch.data, np.uint8)
        idx = batch.offset + off
        ok = batch.length >= off + size
        idx = np.where(ok, idx, 0)
        b = np.stack([raw[idx + k] for k in range(size)], axis=1)
        pids = b.copy().view(np.dtype(self._endian + f"i{size}")).reshape(-1).astype(np.int32)
        return np.where(ok, pids, -1)

    # -- events ----------------------------------------------------------------------
    def _cpu_events(self, cpu: int, buffer: Optional[str], ids: Optional[np.ndarray],
                    start: Optional[int], end: Optional[int]) -> Iterator[Tuple[int, int, int, Any]]:
        """(sort ts, cpu, seq, item) for one CPU, lost markers placed before their event."""
        seq = 0
        comm = self.metadata.comm
        get_fmt = self.catalog.get
        kg = self.keep_going
        for batch in self.batches(cpu, buffer):
            keep = self._select(batch, ids, start, end)
            pids = self._pids(batch)
            lost = sorted(batch.lost)
            li = 0
            ts_l = batch.ts.tolist()
            idx = np.nonzero(keep)[0].tolist()
            offs = batch.offset.tolist()
            lens = batch.length.tolist()
            tids = batch.type_id.tolist()
            pid_l = pids.tolist()
            data = memoryview(batch.data)
            fmts: Dict[int, Optional[EventFormat]] = {}
            for i in idx:
                while li < len(lost) and lost[li].index <= i:
                    m = lost[li]
                    li += 1
                    if self._in_range(m.ts, start, end):
                        yield (ts_l[i], cpu, seq, LostEvents(m.ts + self.ts_offset, cpu, m.count))
                        seq += 1
                tid = tids[i]
                fmt = fmts.get(tid, 0)
                if fmt == 0:
                    fmt = fmts[tid] = get_fmt(tid)
                pid = pid_l[i]
                o = offs[i]
                ev = Event(ts_l[i], cpu, pid, comm(pid), fmt, data[o:o + lens[i]], kg)
                yield (ts_l[i], cpu, seq, ev)
                seq += 1
            for m in lost[li:]:
                if self._in_range(m.ts, start, end):
                    t = m.ts + self.ts_offset
                    yield (t, cpu, seq, LostEvents(t, cpu, m.count))
                    seq += 1

    @staticmethod
    def _in_range(ts: int, start: Optional[int], end: Optional[int]) -> bool:
        return (start is None or ts >= start) and (end is None or ts <= end)

    def events(self, cpus: Optional[Iterable[int]] = None, events: Optional[Sequence[str]] = None,
               start: Time = None, end: Time = None,
               buffer: Optional[str] = None, sources: Optional[Sequence[str]] = None) -> Iterator[Union[Event, LostEvents]]:
        """Events (and :class:`LostEvents` markers) of all CPUs, in timestamp order.

        ``events`` takes "system", "system:name", a bare name or globs; ``start`` and
        ``end`` are inclusive trace-clock integers (a float is seconds).
        """
        if not self._selected(sources):
            return
        want = set(cpus) if cpus is not None else None
        ids = self._ids(events)
        s, e = _ns(start), _ns(end)
        streams = [self._cpu_events(c, buffer, ids, s, e) for c in self.cpus(buffer)
                   if want is None or c in want]
        yield from ordered(streams)

    # -- tables ----------------------------------------------------------------------
    def _names_for(self, type_ids: np.ndarray) -> Tuple[np.ndarray, List[str]]:
        uniq, inv = np.unique(type_ids, return_inverse=True)
        names = []
        for t in uniq.tolist():
            f = self.catalog.get(t)
            names.append(f.full_name if f else f"unknown:{t}")
        return inv.reshape(-1), names

    def _comm_column(self, pids: np.ndarray) -> Tuple[np.ndarray, List[str]]:
        uniq, inv = np.unique(pids, return_inverse=True)
        return inv.reshape(-1), [self.metadata.comm(int(p)) for p in uniq.tolist()]

    def table(self, cpus: Optional[Iterable[int]] = None, events: Optional[Sequence[str]] = None,
              start: Time = None, end: Time = None, buffer: Optional[str] = None,
              sources: Optional[Sequence[str]] = None) -> Any:
        """All selected events as a pyarrow Table: ts, cpu, pid, comm, event (time order)."""
        parts = []
        if not self._selected(sources):
            return base_schema().empty_table()
        for cpu, batch, keep in self._batches_selected(cpus, events, start, end, buffer):
            sel = np.nonzero(keep)[0]
            if not sel.size:
                continue
            parts.append(self._base_columns(cpu, batch, sel))
        return sorted_table(parts, base_schema())

    def _batches_selected(self, cpus, events, start, end, buffer):
        want = set(cpus) if cpus is not None else None
        ids = self._ids(events)
        s, e = _ns(start), _ns(end)
        for cpu in self.cpus(buffer):
            if want is not None and cpu not in want:
                continue
            for batch in self.batches(cpu, buffer):
                yield cpu, batch, self._select(batch, ids, s, e)

    def _base_columns(self, cpu: int, batch: EventBatch, sel: np.ndarray) -> Dict[str, Any]:
        import pyarrow as pa
        pids = self._pids(batch)[sel]
        ev_idx, ev_names = self._names_for(batch.type_id[sel])
        c_idx, c_names = self._comm_column(pids)
        return {
            "ts": pa.array(batch.ts[sel], pa.uint64()),
            "cpu": pa.array(np.full(sel.size, cpu, np.uint16), pa.uint16()),
            "pid": pa.array(pids, pa.int32()),
            "comm": pa.DictionaryArray.from_arrays(pa.array(c_idx.astype(np.int32)),
                                                   pa.array(c_names, pa.string())),
            "event": pa.DictionaryArray.from_arrays(pa.array(ev_idx.astype(np.int32)),
                                                    pa.array(ev_names, pa.string())),
        }

    def event_table(self, event: str, cpus: Optional[Iterable[int]] = None, start: Time = None,
                    end: Time = None, buffer: Optional[str] = None) -> Any:
        """One event type with its fields as typed columns (ints, strings, lists).

        A field named like a base column (``cpu`` of workqueue events) is called
        ``field_cpu``.
        """
        fmt = self.catalog.by_name(event)
        if fmt is None:
            raise VmtraceError(f"{self.name}: no event {event!r} in this trace")
        parts = [cols for _, cols in self.event_parts([fmt.full_name], cpus, start, end, buffer)]
        return sorted_table(parts, event_schema(fmt))

    def event_parts(self, events: Optional[Sequence[str]] = None,
                    cpus: Optional[Iterable[int]] = None, start: Time = None, end: Time = None,
                    buffer: Optional[str] = None) -> Iterator[Tuple[EventFormat, Dict[str, Any]]]:
        """(format, arrow columns) per event type per decoded chunk, in one pass.

        Exports of many event types use this so the trace is decoded once, not once
        per type; chunks arrive per CPU, not in global time order.
        """
        for cpu, batch, keep in self._batches_selected(cpus, events, start, end, buffer):
            if not keep.any():
                continue
            tids = batch.type_id
            for t in np.unique(tids[keep]).tolist():
                fmt = self.catalog.get(t)
                if fmt is None:
                    continue
                sel = np.nonzero(keep & (tids == t))[0]
                cols = self._base_columns(cpu, batch, sel)
                del cols["event"]
                fields = fmt.columns(batch, sel, keep_going=self.keep_going)
                for f in fmt.event_fields:
                    cols[column_name(f.name)] = arrow_column(fields[f.name], f)
                yield fmt, cols

    # -- counts ----------------------------------------------------------------------
    def stats(self, buffer: Optional[str] = None, *, cpus: Optional[Iterable[int]] = None,
              events: Optional[Sequence[str]] = None, start: Time = None, end: Time = None,
              sources: Optional[Sequence[str]] = None) -> Dict[str, Any]:
        """Per-CPU and per-event counts, lost events and skipped (corrupt) pages, of the
        selection (a lost-events marker counts when its CPU and time are selected)."""
        per_cpu: Dict[int, Dict[str, Any]] = {}
        per_event: Dict[str, int] = {}
        counts = np.zeros(1 << 16, np.int64)
        want = set(cpus) if cpus is not None else None
        ids = self._ids(events)
        s, e = _ns(start), _ns(end)
        for cpu in self.cpus(buffer) if self._selected(sources) else []:
            if want is not None and cpu not in want:
                continue
            st = per_cpu[cpu] = {"events": 0, "pages": 0, "lost": 0, "lost_unknown": 0,
                                 "problems": 0, "first_ts": None, "last_ts": None}
            for batch in self.batches(cpu, buffer):
                keep = self._select(batch, ids, s, e)
                tids = batch.type_id[keep]
                ts = batch.ts[keep]
                n = len(tids)
                st["events"] += n
                st["pages"] += batch.pages
                st["problems"] += len(batch.problems)
                for m in batch.lost:
                    if not self._in_range(m.ts, s, e):
                        continue
                    if m.count >= 0:
                        st["lost"] += m.count
                    else:
                        st["lost_unknown"] += 1
                if n:
                    counts += np.bincount(tids, minlength=1 << 16)
                    if st["first_ts"] is None:
                        st["first_ts"] = int(ts[0])
                    st["last_ts"] = int(ts[-1])
        for t in np.nonzero(counts)[0].tolist():
            f = self.catalog.get(t)
            per_event[f.full_name if f else f"unknown:{t}"] = int(counts[t])
        return {
            "events": int(counts.sum()),
            "lost": sum(s["lost"] for s in per_cpu.values()),
            "lost_unknown": sum(s["lost_unknown"] for s in per_cpu.values()),
            "cpus": per_cpu,
            "per_event": dict(sorted(per_event.items(), key=lambda kv: (-kv[1], kv[0]))),
        }


def trace_identity(trace: Any) -> Tuple[str, str]:
    """(role, name) of a single trace: the session.json beside the file names it (a
    guest's name, or the host); else the hostname in the trace, a guest if the vmtrace
    agent recorded it; else ("trace", "trace"). Used to label machines and tracks."""
    import json
    path = str(getattr(getattr(trace, "source", None), "path", "") or getattr(trace, "name", "") or "")
    if path:
        sj = os.path.join(os.path.dirname(os.path.abspath(path)), "session.json")
        try:
            with builtins.open(sj, encoding="utf-8") as f:
                doc = json.load(f)
            base = os.path.basename(path)
            for gname, g in (doc.get("guests") or {}).items():
                if isinstance(g, dict) and g.get("file") == base:
                    return ("guest", str(gname))
            if (doc.get("host") or {}).get("file") == base:
                return ("host", "host")
        except (OSError, ValueError, AttributeError):
            pass
    opts = getattr(getattr(trace, "source", None), "options", None) or {}
    host = opts.get("hostname")
    if "agent" in str(opts.get("version", "")):
        return ("guest", str(host or "guest"))
    if host:
        return ("trace", str(host))
    return ("trace", "trace")


def _layout(source: Any, name: str) -> PageLayout:
    try:
        return layout_from_headers(source.header_page, source.header_event,
                                   endian=source.endian, page_size=source.page_size)
    except FormatError as e:
        raise e.at(source=f"{name}: {e.source}" if e.source else name) from None


def _common_layout(catalog: EventCatalog, endian: str) -> Dict[str, Tuple[int, int]]:
    """Offsets of the common fields, the same for every event of a kernel."""
    for ev_id in catalog.ids():
        fmt = catalog.get(ev_id)
        if fmt and fmt.field("common_pid") is not None:
            return {f.name: (f.offset, f.size) for f in fmt.common_fields}
    return {"common_pid": (4, 4)}
