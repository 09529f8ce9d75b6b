"""Text as ``trace-cmd report`` prints it, for any Source.

A single trace prints exactly what trace-cmd prints for the same file (the header
lines, then one line per event; several buffers interleaved by time with the buffer's
name in front). A session's lines (:func:`vmtrace.session.session_lines`) are each
source's own lines, tagged and on the host's clock, written out with :func:`blocks`.
"""
from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

from vmtrace.merge import keyed, ordered

BLOCK_LINES = 4096


def _buffers_with_data(trace: Any) -> list:
    return [b for b in trace.source.buffers if any(c.size for c in b.cpus)]


def trace_lines(trace: Any, *, cpus: Optional[Sequence[int]] = None, events: Optional[Sequence[str]] = None,
                start: Any = None, end: Any = None) -> Iterator[str]:
    """Every line trace-cmd report prints on stdout for one trace, in order."""
    from vmtrace.format.render import TextRenderer, header_lines
    yield from header_lines(trace.source.nr_cpus or len(trace.cpus()))
    bufs = _buffers_with_data(trace)
    if not bufs:
        return
    r = TextRenderer(trace.metadata, long_size=trace.source.long_size)
    if len(bufs) == 1:
        b = bufs[0]
        yield from r.lines(trace.events(cpus=cpus, events=events, start=start, end=end, buffer=b.name),
                           f"{b.name}: " if b.name else "")
        return
    # several buffers: trace-cmd merges them by time, each line naming its buffer
    streams = [keyed(((ev, f"{b.name}: " if b.name else "")
                      for ev in trace.events(cpus=cpus, events=events, start=start, end=end, buffer=b.name)),
                     _ts_of_pair, k) for k, b in enumerate(bufs)]
    for ev, prefix in ordered(streams):
        yield from r.lines((ev,), prefix)


def _ts_of_pair(pair: Any) -> int:
    return pair[0].ts


def trace_blocks(trace: Any, *, cpus: Optional[Sequence[int]] = None, events: Optional[Sequence[str]] = None,
                 start: Any = None, end: Any = None, fast: bool = True) -> Iterator[bytes]:
    """The text of :func:`trace_lines`, UTF-8, in blocks of whole lines. Unfiltered
    reports (``cpus`` allowed) of one buffer go through the bulk renderer
    (:mod:`vmtrace.format.fastrender`); anything else line by line."""
    bufs = _buffers_with_data(trace)
    if fast and len(bufs) == 1 and events is None and start is None and end is None:
        from vmtrace.format import fastrender
        if fastrender.supported(trace):
            from vmtrace.format.render import header_lines
            yield ("\n".join(header_lines(trace.source.nr_cpus or len(trace.cpus()))) + "\n").encode()
            yield from fastrender.report_blocks(trace, bufs[0], cpus)
            return
    yield from blocks(trace_lines(trace, cpus=cpus, events=events, start=start, end=end))


def blocks(lines: Iterator[str]) -> Iterator[bytes]:
    """Lines joined into UTF-8 blocks (a write per block, not per line)."""
    buf = []
    for line in lines:
        buf.append(line)
        if len(buf) >= BLOCK_LINES:
            buf.append("")
            yield "\n".join(buf).encode("utf-8", "surrogateescape")
            buf = []
    if buf:
        buf.append("")
        yield "\n".join(buf).encode("utf-8", "surrogateescape")
