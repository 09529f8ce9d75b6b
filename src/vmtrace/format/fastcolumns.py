"""Field columns for the bulk renderer: the fields one event type's lines use, gathered.

For a (batch, event type) group only the fields its print fmt (or plugin) reads are
gathered, as numpy columns that keep char data raw until a line needs its text; text is
then made once per distinct value (``_TEXT``, ``_UTF8``), which is where most of the
bulk path's speed comes from. Rows too short for the fields are flagged ``bad`` and
printed per event by the caller.
"""
from __future__ import annotations

from typing import Any, Dict, List, Tuple

import numpy as np

from vmtrace.format.fastmerge import _Seg
from vmtrace.format.printfmt import FieldInfo



# Column kinds: ("num", 1-D int array) ("arr", 2-D int array) ("str", raw text per row:
# an "S" array or an object array of bytes; the text is what precedes the first NUL).
_STRUCT_OK = (1, 2, 4, 8)


def _bulk_field(fi: FieldInfo) -> bool:
    if not fi.is_array:
        return fi.size in _STRUCT_OK
    if fi.is_string:
        return fi.is_dynamic or fi.size > 0
    return (not fi.is_dynamic) and fi.size > 0 and fi.elsize in _STRUCT_OK


class _TextMemo(dict):
    """raw char data -> the str the per-event path makes of it (cut at NUL, UTF-8)."""

    def __missing__(self, raw: bytes) -> str:
        i = raw.find(b"\0")
        v = (raw if i < 0 else raw[:i]).decode("utf-8", "replace")
        if len(self) >= 1 << 16:
            self.clear()
        self[raw] = v
        return v


class _Utf8Memo(dict):
    """raw char data -> that text encoded as output bytes."""

    def __missing__(self, raw: bytes) -> bytes:
        v = _TEXT[raw].encode("utf-8", "surrogateescape")
        if len(self) >= 1 << 16:
            self.clear()
        self[raw] = v
        return v


_TEXT = _TextMemo()
_UTF8 = _Utf8Memo()


class _Group:
    """Fields of some events of one type, gathered from one batch."""

    def __init__(self, seg: _Seg, offs: np.ndarray, lens: np.ndarray, ty: Any):
        n = self.n = offs.shape[0]
        self.cols: Dict[str, tuple] = {}
        span = ty.span
        short = lens < span
        bad = short
        if span and n:
            if short.any():
                offs = np.where(short, 0, offs)
            rows = seg.window(span)[offs]
        else:
            rows = np.zeros((n, max(span, 0)), np.uint8)
        if ty.rec is not None:
            rec = rows.view(ty.rec).reshape(n)
            for name in ty.rec.names:
                self.cols[name] = ("num", rec[name])
        for name, fi in ty.others:
            o, s = fi.offset, fi.size
            if fi.is_string and not fi.is_dynamic:
                self.cols[name] = ("str", np.ascontiguousarray(rows[:, o:o + s]).view("S%d" % s).reshape(n))
            elif fi.is_string:
                col, b = _dyn_strings(seg, rows, offs, lens, fi, short)
                bad = bad | b
                self.cols[name] = col
            else:
                es = fi.elsize
                cnt = s // es
                dt = np.dtype("<%s%d" % ("i" if fi.signed else "u", es))
                blk = np.ascontiguousarray(rows[:, o:o + cnt * es]).view(dt).reshape(n, cnt)
                self.cols[name] = ("arr", blk)
        self.bad = bad


def _dyn_strings(seg: _Seg, rows: np.ndarray, offs: np.ndarray, lens: np.ndarray,
                 fi: FieldInfo, short: np.ndarray) -> Tuple[tuple, np.ndarray]:
    """__data_loc strings: the location word of each row, then one gather of the text
    (rows padded to the longest with NULs, which the text stops at anyway)."""
    n = offs.shape[0]
    o = fi.offset
    w = np.ascontiguousarray(rows[:, o:o + 4]).view("<u4").reshape(n).astype(np.int64)
    start = (w & 0xFFFF) + (o + 4 if fi.is_rel else 0)
    length = w >> 16
    bad = (start + length > lens) | short
    length = np.where(bad, 0, length)
    absolute = np.where(bad, 0, offs + start)
    longest = int(length.max()) if n else 0
    if longest == 0:
        return ("str", np.zeros(n, "S1")), bad
    if n * longest <= 1 << 22 and int(absolute.max()) + longest <= seg.raw.shape[0]:
        block = seg.window(longest)[absolute]
        block[np.arange(longest)[None, :] >= length[:, None]] = 0
        return ("str", block.view("S%d" % longest).reshape(n)), bad
    out = np.empty(n, dtype=object)
    out[:] = [b""] * n
    for L in np.unique(length[length > 0]).tolist():
        idx = np.flatnonzero(length == L)
        out[idx] = seg.window(L)[absolute[idx]].view("S%d" % L).reshape(-1).tolist()
    return ("str", out), bad


def _materialize(col: tuple) -> list:
    if col[0] == "str":
        return list(map(_TEXT.__getitem__, col[1].tolist()))
    return col[1].tolist()


def _concat_groups(groups: List[_Group]) -> _Group:
    """One group of the rows of several (same event type, other chunks)."""
    g = _Group.__new__(_Group)
    g.n = sum(x.n for x in groups)
    g.bad = np.zeros(g.n, bool)
    g.cols = {}
    for name, c in groups[0].cols.items():
        parts = [x.cols[name][1] for x in groups]
        if c[0] == "str" and any(p.dtype == object for p in parts):
            parts = [p.astype(object) for p in parts]
        g.cols[name] = (c[0], np.concatenate(parts))
    return g
