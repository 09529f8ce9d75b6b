"""Many payloads of one event type decoded at once, into numpy columns.

A trace holds millions of events of a few dozen types, so per-event Python is what a
columnar reader avoids: fixed fields come out of one gather (in C with the page walker's
``_walk.gather``, else numpy), strings are decoded once per distinct value, and only
variable-length fields other than strings fall back to the per-event decoder.

:class:`ColumnarDecoding` is a base of :class:`vmtrace.format.events.EventFormat`, so
``fmt.columns(...)`` stays where callers find it while the numpy machinery lives apart
from the format parser. It relies on the format's ``fields``, ``endian``,
``full_name``, ``field(name)`` and ``_value(field, payload)`` (the per-event decode);
this module imports nothing from events.py, which keeps the two free of a cycle. Field
kinds are read through ``Field.is_string``/``is_dynamic`` for the same reason.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from vmtrace.errors import FormatError

try:  # fixed-field gathers in C, built with the page walk; numpy does the same without
    from vmtrace.format._walk import gather as _gather, gather_types as _gather_types
except ImportError:  # pragma: no cover - depends on the build
    _gather = _gather_types = None
if os.environ.get("VMTRACE_WALKER", "").lower() == "numpy":
    _gather = _gather_types = None


def _text(raw: bytes) -> str:
    """Bytes up to the first NUL as text; invalid UTF-8 does not stop a report."""
    i = raw.find(b"\0")
    if i >= 0:
        raw = raw[:i]
    return raw.decode("utf-8", errors="replace")


class ColumnarDecoding:
    """The columnar half of an event format (see the module text for what it relies on)."""

    def row_dtype(self, *, common: bool = False) -> Tuple[np.dtype, List[Any]]:
        """A structured dtype covering the fixed fields, and the fields left out of it."""
        names, formats, offsets, other = [], [], [], []
        span = 0
        for f in self.fields:
            if f.is_common and not common:
                continue
            dt = f.numpy_dtype(self.endian)
            if dt is None:
                other.append(f)
                if f.is_dynamic:   # the location word is read from the gathered rows
                    span = max(span, f.offset + 4)
                continue
            names.append(f.name)
            formats.append(dt)
            offsets.append(f.offset)
            span = max(span, f.offset + f.size)
        return np.dtype({"names": names, "formats": formats, "offsets": offsets,
                         "itemsize": max(span, 1)}), other

    def columns(self, batch: Any, select: Optional[np.ndarray] = None, *,
                common: bool = False, keep_going: bool = False,
                strings: str = "str") -> Dict[str, np.ndarray]:
        """Decode the selected events of ``batch`` (all of this type) into arrays.

        Fixed fields come out of one numpy gather; strings become ``str`` object
        arrays (``strings="bytes"``: fixed-width numpy bytes ``S<N>``, text up to the
        first NUL, not decoded, see :func:`text_column`); variable-length fields are
        decoded per event. A payload too short for the fixed fields raises
        :class:`FormatError` (keep-going: zeros for that row).
        """
        offs = batch.offset if select is None else batch.offset[select]
        lens = batch.length if select is None else batch.length[select]
        return self.columns_at(batch.data, offs, lens, common=common, keep_going=keep_going,
                               strings=strings)

    def _row_plan(self, common: bool) -> Tuple[np.dtype, List[Any], List[Tuple[str, Any]]]:
        plans = self.__dict__.setdefault("_row_plans", {})
        plan = plans.get(common)
        if plan is None:
            dtype, other = self.row_dtype(common=common)
            fixed = [(name, self.field(name)) for name in dtype.names or ()]
            plan = plans[common] = (dtype, other, fixed)
        return plan

    def columns_at(self, data: Any, offs: np.ndarray, lens: np.ndarray, *, common: bool = False,
                   keep_going: bool = False, strings: str = "str") -> Dict[str, np.ndarray]:
        if strings not in ("str", "bytes"):
            raise ValueError(f"strings must be 'str' or 'bytes', not {strings!r}")
        as_bytes = strings == "bytes"
        dtype, other, fixed = self._row_plan(common)
        span = dtype.itemsize
        raw = np.frombuffer(data, np.uint8)
        n = offs.shape[0]
        short = (lens < span) | (offs + span > raw.shape[0])
        offs_safe = offs
        if short.any():
            if not keep_going:
                i = int(np.nonzero(short)[0][0])
                raise FormatError(f"{self.full_name}: payload of {int(lens[i])} bytes is shorter "
                                  f"than its fixed fields ({span} bytes)", offset=int(offs[i]))
            offs_safe = np.where(short, 0, offs)
        if _gather is not None and n and int(offs.min()) >= 0:
            out, locs = self._gather_c(raw, offs, lens, span, dtype, other, fixed, as_bytes)
        else:
            out, locs = self._gather_numpy(raw, offs_safe, span, short, dtype, other, fixed,
                                           as_bytes)
        return self._variable_columns(out, raw, locs, offs, lens, short, other, keep_going,
                                      as_bytes)

    def _variable_columns(self, out: Dict[str, np.ndarray], raw: np.ndarray,
                          locs: Dict[str, np.ndarray], offs: np.ndarray, lens: np.ndarray,
                          short: np.ndarray, other: List[Any], keep_going: bool,
                          as_bytes: bool) -> Dict[str, np.ndarray]:
        """Add the variable-length fields (``__data_loc``, flexible arrays) to ``out``."""
        n = offs.shape[0]
        for f in other:
            if f.is_dynamic and f.is_string:
                if as_bytes:
                    out[f.name] = _dyn_bytes(self, f, raw, locs[f.name], offs, lens, short,
                                             keep_going)
                else:
                    out[f.name] = _dyn_strings(self, f, raw, locs[f.name], offs, lens, short,
                                               keep_going)
                continue
            vals = np.empty(n, dtype=object)
            for i in range(n):
                if short[i]:
                    vals[i] = None
                    continue
                o, ln = int(offs[i]), int(lens[i])
                try:
                    vals[i] = self._value(f, memoryview(raw[o:o + ln]))
                except FormatError:
                    if not keep_going:
                        raise
                    vals[i] = None
            out[f.name] = vals
        return out


    def _gather_numpy(self, raw: np.ndarray, offs_safe: np.ndarray, span: int, short: np.ndarray,
                      dtype: np.dtype, other: List[Any], fixed: List[Tuple[str, Any]],
                      as_bytes: bool) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """Fixed fields and __data_loc words with numpy: one gather of every row's first
        ``span`` bytes, then a view per field. The fallback of :meth:`_gather_c`."""
        n = offs_safe.shape[0]
        if raw.shape[0] >= span:
            win = np.lib.stride_tricks.sliding_window_view(raw, span)
            rows = win[offs_safe]
        else:
            rows = np.zeros((n, span), np.uint8)
        if short.any():
            rows[short] = 0
        out: Dict[str, np.ndarray] = {}
        rec = np.ascontiguousarray(rows).view(dtype).reshape(n)
        for name, f in fixed:
            if f is not None and f.is_string:
                block = rows[:, f.offset:f.offset + f.size]
                out[name] = cut_at_nul(block) if as_bytes else _strings_column(block)
            else:
                out[name] = np.ascontiguousarray(rec[name])
        u4 = np.dtype(self.endian + "u4")
        locs = {f.name: rows[:, f.offset:f.offset + 4].copy().view(u4).reshape(n)
                for f in other if f.is_dynamic}
        return out, locs

    def _gather_c(self, raw: np.ndarray, offs: np.ndarray, lens: np.ndarray, span: int,
                  dtype: np.dtype, other: List[Any], fixed: List[Tuple[str, Any]],
                  as_bytes: bool) -> Tuple[Dict[str, np.ndarray], Dict[str, np.ndarray]]:
        """:meth:`_gather_numpy` in one C pass over the payloads (``_walk.gather``): each
        field straight into its own column, short payloads as zero rows."""
        out, locs, specs, strs = self._gather_specs(offs.shape[0], dtype, other, fixed, as_bytes)
        if lens.dtype != np.int32:
            lens = np.clip(lens, -1, 2 ** 31 - 1)
        _gather(raw, np.ascontiguousarray(offs, np.int64), np.ascontiguousarray(lens, np.int32),
                span, specs)
        return self._gathered(out, strs, fixed), locs

    def _gather_specs(self, n: int, dtype: np.dtype, other: List[Any],
                      fixed: List[Tuple[str, Any]], as_bytes: bool):
        """Empty columns for ``n`` rows and the C gather's specs that fill them."""
        out: Dict[str, np.ndarray] = {}
        specs = []
        strs = []
        for name, f in fixed:
            if f is not None and f.is_string:
                if as_bytes:
                    col = out[name] = np.empty(n, f"S{f.size}")
                    specs.append((f.offset, f.size, 1, col))
                else:
                    col = np.empty((n, f.size), np.uint8)
                    strs.append((name, col))
                    specs.append((f.offset, f.size, 0, col))
            else:
                dt, foff = dtype.fields[name][:2]
                col = out[name] = np.empty(n, dt)
                specs.append((foff, dt.itemsize, 0, col))
        u4 = np.dtype(self.endian + "u4")
        locs = {}
        for f in other:
            if f.is_dynamic:
                col = locs[f.name] = np.empty(n, u4)
                specs.append((f.offset, 4, 0, col))
        return out, locs, specs, strs

    @staticmethod
    def _gathered(out: Dict[str, np.ndarray], strs, fixed) -> Dict[str, np.ndarray]:
        for name, col in strs:
            out[name] = _strings_column(col)
        if strs and len(out) > 1:   # the order of the fields, as the numpy gather gives them
            out = {name: out[name] for name, _ in fixed}
        return out


def _dyn_strings(fmt: ColumnarDecoding, f: Any, raw: np.ndarray, words: np.ndarray,
                 offs: np.ndarray, lens: np.ndarray, short: np.ndarray,
                 keep_going: bool) -> np.ndarray:
    """__data_loc strings of many events without a Python step per event.

    Events are grouped by string length; each group is one gather into a fixed-width
    block, and only distinct strings are turned into ``str``. Most traces repeat a few
    names (slab caches, devices, files), so this is a handful of numpy calls.
    """
    n = offs.shape[0]
    out = np.empty(n, dtype=object)
    if n == 0:
        return out
    absolute, length, bad = _dyn_locations(fmt, f, words, offs, lens, short, keep_going)
    out[bad] = None
    good = ~bad
    for L in np.unique(length[good]).tolist():
        idx = np.nonzero(good & (length == L))[0]
        if L == 0:
            out[idx] = ""
            continue
        block = np.lib.stride_tricks.sliding_window_view(raw, L)[absolute[idx]]
        out[idx] = _strings_column(block)
    return out


def _dyn_locations(fmt: ColumnarDecoding, f: Any, words: np.ndarray, offs: np.ndarray,
                   lens: np.ndarray, short: np.ndarray, keep_going: bool):
    """(absolute start, length, bad rows) of a __data_loc field from its location words."""
    w = words.astype(np.int64)
    start = (w & 0xFFFF) + (f.offset + 4 if f.rel else 0)
    length = w >> 16
    bad = short | (start + length > lens.astype(np.int64))
    if bad.any() and not keep_going:
        i = int(np.nonzero(bad & ~short)[0][0]) if (bad & ~short).any() else int(np.nonzero(bad)[0][0])
        raise FormatError(f"{fmt.full_name}: field {f.name!r} points at bytes {int(start[i])}.."
                          f"{int(start[i] + length[i])} past the payload end {int(lens[i])}",
                          offset=int(offs[i]))
    return offs.astype(np.int64) + start, length, bad


# Above this width a __data_loc column is gathered per distinct length instead of at once.
_DYN_ONE_GATHER = 64


def _dyn_bytes(fmt: ColumnarDecoding, f: Any, raw: np.ndarray, words: np.ndarray,
               offs: np.ndarray, lens: np.ndarray, short: np.ndarray,
               keep_going: bool) -> np.ndarray:
    """__data_loc strings as one fixed-width bytes column (``S<longest>``), NUL-cut.

    Bad rows (keep-going) are empty. No Python step per event and no ``str``.
    """
    n = offs.shape[0]
    absolute, length, bad = _dyn_locations(fmt, f, words, offs, lens, short, keep_going)
    if bad.any():
        length = np.where(bad, 0, length)
        absolute = np.where(bad, 0, absolute)
    width = int(length.max()) if n else 0
    if width == 0:
        return np.zeros(n, "S1")
    width = (width + 7) & ~7
    block = np.zeros((n, width), np.uint8)
    if width <= _DYN_ONE_GATHER:
        # One gather of the widest string for every row, then the bytes past each
        # row's own length are cleared (a window past the buffer end is read per byte).
        fits = absolute + width <= raw.shape[0]
        if fits.all():
            block[:] = np.lib.stride_tricks.sliding_window_view(raw, width)[absolute]
        else:
            idx = np.minimum(absolute[:, None] + np.arange(width)[None, :], raw.shape[0] - 1)
            block[:] = raw[idx]
        return cut_at_nul(block, length)
    else:
        for L in np.unique(length).tolist():
            if L == 0:
                continue
            idx = np.nonzero(length == L)[0]
            block[idx, :L] = np.lib.stride_tricks.sliding_window_view(raw, L)[absolute[idx]]
    return cut_at_nul(block)


def batch_columns(batch: Any, catalog: Any, *, common: bool = False,
                  keep_going: bool = False, strings: str = "str"
                  ) -> List[Tuple[ColumnarDecoding, np.ndarray, Dict[str, np.ndarray]]]:
    """Every event type of ``batch`` to columns: ``(format, rows, columns)`` per type.

    Types come in ascending id order, ``rows`` are the batch indices of that type's
    events (ascending) and ``columns`` is exactly ``fmt.columns(batch, rows, ...)``;
    events of types the catalog does not know are left out. With the C extension the
    fixed fields of all types are gathered in one pass over the batch in stream order
    (``_walk.gather_types``), which reads the chunk once, sequentially.
    """
    if strings not in ("str", "bytes"):
        raise ValueError(f"strings must be 'str' or 'bytes', not {strings!r}")
    n = len(batch)
    if not n:
        return []
    tids = batch.type_id
    offs, lens = batch.offset, batch.length
    if _gather_types is None or offs.dtype != np.int64 or lens.dtype != np.int32 \
            or tids.dtype != np.uint16 or int(offs.min()) < 0:
        return _batch_columns_by_type(batch, catalog, common, keep_going, strings)
    as_bytes = strings == "bytes"
    raw = np.frombuffer(batch.data, np.uint8)
    counts = np.bincount(tids)
    plans = []
    todo = []
    spans = np.zeros(counts.shape[0], np.int64)
    for t in np.flatnonzero(counts).tolist():
        fmt = catalog.get(t)
        if fmt is None:
            continue
        dtype, other, fixed = fmt._row_plan(common)
        cnt = int(counts[t])
        out, locs, specs, strs = fmt._gather_specs(cnt, dtype, other, fixed, as_bytes)
        sel = np.empty(cnt, np.int64)
        spans[t] = dtype.itemsize
        plans.append((t, dtype.itemsize, sel, specs))
        todo.append((fmt, sel, out, locs, strs, other, fixed, dtype.itemsize))
    if not plans:
        return []
    span_of = spans[tids]
    short_all = (lens < span_of) | (offs + span_of > raw.shape[0])
    if not keep_going and short_all.any():
        # The per-type path raises the error for the first short payload, as columns() does.
        return _batch_columns_by_type(batch, catalog, common, keep_going, strings)
    _gather_types(raw, np.ascontiguousarray(offs), np.ascontiguousarray(lens),
                  np.ascontiguousarray(tids), plans)
    result = []
    for fmt, sel, out, locs, strs, other, fixed, span in todo:
        out = fmt._gathered(out, strs, fixed)
        if other:
            o, ln = offs[sel], lens[sel]
            out = fmt._variable_columns(out, raw, locs, o, ln, short_all[sel], other,
                                        keep_going, as_bytes)
        result.append((fmt, sel, out))
    return result


def _batch_columns_by_type(batch: Any, catalog: Any, common: bool, keep_going: bool,
                           strings: str):
    """:func:`batch_columns` with one :meth:`EventFormat.columns` call per type."""
    tids = batch.type_id
    order = np.argsort(tids, kind="stable")
    sorted_t = tids[order]
    edges = np.flatnonzero(np.diff(sorted_t)) + 1
    bounds = [0, *edges.tolist(), len(order)]
    result = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        fmt = catalog.get(int(sorted_t[a]))
        if fmt is None:
            continue
        sel = order[a:b]
        result.append((fmt, sel, fmt.columns(batch, sel, common=common, keep_going=keep_going,
                                             strings=strings)))
    return result


_ONES = np.uint64(0x0101010101010101)
_HIGHS = np.uint64(0x8080808080808080)


# _BYTE_MASKS[k]: the low k bytes of a word set.
_BYTE_MASKS = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [(1 << 64) - 1], np.uint64)


def cut_at_nul(block: np.ndarray, lengths: Optional[np.ndarray] = None) -> np.ndarray:
    """``char[N]`` rows (an n x N uint8 array) -> ``S<N>`` values ending at the first NUL.

    Works on 8-byte words: ``(x - 0x01..) & ~x & 0x80..`` flags zero bytes, and its
    lowest flag is exactly the first NUL, so each word needs a few integer operations
    instead of a pass per byte. ``lengths`` also clears each row past its own length.
    """
    n, width = block.shape
    padded = (width + 7) & ~7
    if padded != width or not block.flags.c_contiguous:
        words = np.zeros((n, padded), np.uint8)
        words[:, :width] = block
    else:
        words = block.copy()
    w = words.view(np.uint64)               # (n, padded // 8), native order
    big = np.little_endian is False
    dead: Optional[np.ndarray] = None
    one, seven = np.uint64(1), np.uint64(7)
    for j in range(w.shape[1]):
        x = w[:, j]
        if big:
            x = x.byteswap()
        t = (x - _ONES) & ~x & _HIGHS
        keep = ((t & (~t + one)) >> seven) - one   # bytes before the first NUL
        if lengths is not None:
            keep &= _BYTE_MASKS[np.clip(lengths - 8 * j, 0, 8)]
        if dead is not None:
            keep[dead] = 0
        x &= keep
        w[:, j] = x.byteswap() if big else x
        if j + 1 < w.shape[1]:
            dead = (t != 0) if dead is None else (dead | (t != 0))
    return words.view(f"S{padded}").reshape(n).astype(f"S{width}") if padded != width \
        else words.view(f"S{width}").reshape(n)


def text_column(col: np.ndarray) -> np.ndarray:
    """A bytes column (``strings="bytes"``) as ``str`` objects, decoding distinct values once."""
    if col.dtype == object:
        return col
    uniq, inv = np.unique(col, return_inverse=True)
    texts = np.array([_text(u) for u in uniq.tolist()] or [""], dtype=object)
    return texts[inv.reshape(-1)] if col.shape[0] else np.empty(0, dtype=object)


def _strings_column(block: np.ndarray) -> np.ndarray:
    """char[N] rows -> str objects, cut at the first NUL like the kernel prints them."""
    block = np.array(block, copy=True)
    nul = np.cumsum(block == 0, axis=1) > 0
    block[nul] = 0
    fixed = np.ascontiguousarray(block).view(f"S{block.shape[1]}").reshape(-1)
    uniq, inv = np.unique(fixed, return_inverse=True)
    texts = np.array([_text(u) for u in uniq.tolist()] or [""], dtype=object)
    return texts[inv.reshape(-1)] if fixed.shape[0] else np.empty(0, dtype=object)

