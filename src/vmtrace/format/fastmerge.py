"""The per-CPU merge of the bulk renderer: every item of a buffer in trace-cmd's order.

Each CPU's batches (:meth:`vmtrace.api.Trace.batches`) become items (events, plus
lost-event markers placed like :mod:`vmtrace.api` places them). trace-cmd (and
``heapq.merge`` in the per-event path) repeatedly takes the CPU whose next item has the
smallest timestamp, ties to the lower CPU. For streams that are sorted that is a stable
sort by (timestamp, CPU, position); for streams whose clock steps back it is the same
sort on each stream's running maximum of the timestamp, which is what we sort on. Items
are released in windows: everything below the smallest "last pending key" of the CPUs
that still have data, so memory is bounded by about one decoded chunk per CPU.
"""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

_U64 = np.uint64


class _Seg:
    """Pending items of one batch: keys (running max of ts), codes (event i, or ~marker)."""

    __slots__ = ("batch", "cpu", "keys", "codes", "markers", "pids", "lo", "raw", "_wins")

    def __init__(self, batch: Any, cpu: int, keys: np.ndarray, codes: np.ndarray,
                 markers: list, pids: np.ndarray):
        self.batch, self.cpu, self.keys, self.codes = batch, cpu, keys, codes
        self.markers, self.pids, self.lo = markers, pids, 0
        self.raw = np.frombuffer(batch.data, np.uint8)
        self._wins: Dict[int, np.ndarray] = {}

    def window(self, span: int) -> np.ndarray:
        """Rows of ``span`` bytes starting at any offset (a view, no copy)."""
        w = self._wins.get(span)
        if w is None:
            raw = self.raw
            if raw.shape[0] < span:
                raw = np.zeros(span, np.uint8)
            w = self._wins[span] = np.lib.stride_tricks.as_strided(
                raw, (raw.shape[0] - span + 1, span), (1, 1), writeable=False)
        return w


class _Stream:
    def __init__(self, cpu: int, batches: Iterator[Any], owner: "Merge"):
        self.cpu = cpu
        self.it = batches
        self.owner = owner
        self.done = False
        self.segs: List[_Seg] = []
        self.carry = 0

    def pending(self) -> int:
        return sum(s.keys.shape[0] - s.lo for s in self.segs)

    def last(self) -> int:
        s = self.segs[-1]
        return int(s.keys[-1])

    def load(self) -> None:
        while True:
            b = next(self.it, None)
            if b is None:
                self.done = True
                return
            seg = self.owner._segment(b, self.cpu, self)
            if seg is not None:
                self.segs.append(seg)
                return


class Merge:
    """The items of one buffer's CPUs (all, or ``cpus``), merged, a window at a time."""

    def __init__(self, trace: Any, buffer: Any, cpus: Optional[List[int]] = None):
        self.trace = trace
        self.buffer = buffer
        self.cpus = cpus
        self.pid_off, self.pid_size = _pid_field(trace.catalog)

    # -- items of one batch -------------------------------------------------------
    def _segment(self, b: Any, cpu: int, st: _Stream) -> Optional[_Seg]:
        n = len(b)
        lost = sorted(b.lost)
        ts = b.ts
        if not lost:
            keys = ts
            codes = np.arange(n, dtype=np.int64)
            markers: list = []
        else:
            markers = [(m.count,) for m in lost]
            idx = np.array([m.index for m in lost], np.int64)
            inside = idx < n
            at = np.minimum(idx, n)
            codes = np.insert(np.arange(n, dtype=np.int64), at, ~np.arange(len(lost), dtype=np.int64))
            mkeys = np.empty(len(lost), np.uint64)
            if inside.any():
                mkeys[inside] = ts[idx[inside]]
            off = self.trace.ts_offset
            for k in np.flatnonzero(~inside).tolist():
                mkeys[k] = (lost[k].ts + off) % (1 << 64)
            keys = np.insert(ts, at, mkeys)
        if keys.shape[0] == 0:
            return None
        keys = np.maximum.accumulate(keys)
        if st.carry:
            keys = np.maximum(keys, _U64(st.carry))
        st.carry = int(keys[-1])
        return _Seg(b, cpu, keys, codes, markers, self._pids(b))

    def _pids(self, b: Any) -> np.ndarray:
        n = len(b)
        if n == 0:
            return np.zeros(0, np.int64)
        off, size = self.pid_off, self.pid_size
        raw = np.frombuffer(b.data, np.uint8)
        ok = b.length >= off + size
        win = np.lib.stride_tricks.sliding_window_view(raw, size)
        vals = np.ascontiguousarray(win[np.where(ok, b.offset + off, 0)]).view("<i%d" % size)
        return np.where(ok, vals.reshape(-1).astype(np.int64), -1)

    # -- the merge ----------------------------------------------------------------
    def windows(self) -> Iterator[Tuple[List[_Seg], np.ndarray, np.ndarray]]:
        """(segments, segment index per item, code per item) in merged order."""
        cpus = sorted(c.cpu for c in self.buffer.cpus
                      if self.cpus is None or c.cpu in self.cpus)
        streams = [_Stream(c, self.trace.batches(c, self.buffer.name), self) for c in cpus]
        while True:
            for s in streams:
                while not s.done and not s.segs:
                    s.load()
            live = [s for s in streams if not s.done]
            # Everything below the smallest last pending key is final. An item at that
            # key is final too unless a CPU with a lower number can still bring one at
            # the same key (only CPUs whose last pending key is that key can).
            limit = min(s.last() for s in live) if live else None
            tie_cpu = min(s.cpu for s in live if s.last() == limit) if live else None
            pieces = []
            for s in streams:
                while s.segs:
                    seg = s.segs[0]
                    if limit is None:
                        end = seg.keys.shape[0]
                    else:
                        end = int(np.searchsorted(seg.keys, _U64(limit),
                                                  side="right" if s.cpu <= tie_cpu else "left"))
                    if end > seg.lo:
                        pieces.append((seg, seg.lo, end))
                        seg.lo = end
                    if seg.lo >= seg.keys.shape[0]:
                        s.segs.pop(0)
                        continue
                    break
            if pieces:
                segs = []
                seg_ix = []
                keys = []
                codes = []
                for k, (seg, lo, hi) in enumerate(pieces):
                    segs.append(seg)
                    seg_ix.append(np.full(hi - lo, k, np.int32))
                    keys.append(seg.keys[lo:hi])
                    codes.append(seg.codes[lo:hi])
                keys_a = np.concatenate(keys)
                order = np.argsort(keys_a, kind="stable")
                yield segs, np.concatenate(seg_ix)[order], np.concatenate(codes)[order]
            if not live:
                return


def _pid_field(catalog: Any) -> Tuple[int, int]:
    for ev_id in catalog.ids():
        fmt = catalog.get(ev_id)
        f = fmt.field("common_pid") if fmt else None
        if f is not None and f.size in (1, 2, 4, 8):
            return f.offset, f.size
    return 4, 4
