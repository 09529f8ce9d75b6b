"""The one k-way merge: several time-ordered streams into one, by timestamp.

Every place that interleaves streams goes through :func:`ordered`: the CPUs of one
trace (trace-cmd's order: timestamp, then CPU), the buffers of one trace.dat, and the
host and guests of a session (timestamp on the host's clock, then source order). Each
stream yields tuples ``(key..., item)`` already in key order; the keys of different
streams never compare equal (the stream's index and a running count are part of them),
so items themselves are never compared and ties are broken the same way everywhere.
The bulk text renderer does the same ordering on whole columns
(:mod:`vmtrace.format.fastmerge`), with the same tie rule.

A heap merge holds one item per stream: memory stays flat however long the streams.
"""
from __future__ import annotations

import heapq
from typing import Any, Iterable, Iterator, Sequence, Tuple


def ordered(streams: Sequence[Iterable[Tuple[Any, ...]]]) -> Iterator[Any]:
    """The items (last element of each tuple) of all ``streams``, in key order."""
    if len(streams) == 1:
        for t in streams[0]:
            yield t[-1]
        return
    for t in heapq.merge(*streams):
        yield t[-1]


def keyed(items: Iterable[Any], ts: Any, rank: int) -> Iterator[Tuple[int, int, int, Any]]:
    """``(ts(item), rank, n, item)`` for a stream that is ordered by ``ts`` alone: the
    key :func:`ordered` needs, with ``rank`` breaking ties between streams."""
    for n, item in enumerate(items):
        yield ts(item), rank, n, item
