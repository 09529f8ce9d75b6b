"""Ring-buffer pages -> columnar events, decoded in C or with numpy.

A page read from ``trace_pipe_raw`` is a small header (timestamp, commit word) followed
by variable-length records, each with a 32-bit header ``type_len:5, time_delta:27``.
Walking those records is inherently sequential *within* a page, but pages are
independent: each starts from the absolute timestamp in its header. So instead of a
Python loop per record (about 1 M records/s at best) we advance a cursor in *every*
page of a chunk at once, one record per numpy step. The number of steps is the number
of records in the fullest page (a few hundred at most), and each step works on
thousands of pages, so the per-call numpy overhead is amortised over the whole chunk.

Every length, offset and flag comes from a guest and is untrusted: a page whose commit
runs past the page, or a record that runs past the commit, stops that page. Strict
mode raises :class:`FormatError` for the first such problem (in stream order); keep-
going mode keeps the records before it, skips the rest of that page and lists the
problem in :attr:`EventBatch.problems`.

The same walk is written in C (``_walk.c``, an optional extension: one plain loop per
page, about 20x faster). The numpy walk stays as the fallback when the extension is not
built and as the oracle the C walk is tested against (equal events, lost marks and
problems for any bytes); :func:`walker` says which one is in use.

Semantics follow the kernel's ``ring_buffer.c`` and libtraceevent's ``kbuffer``:
padding records advance time by their delta (a discarded event keeps its delta), a
padding record with delta 0 marks the unused rest of the page, a time extend adds
``delta | array[0] << 27`` and an absolute time stamp replaces the clock, taking the
top five bits (which the kernel does not store) from the current time.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Iterable, Iterator, List, NamedTuple, Optional, Union

import numpy as np

from vmtrace.errors import FormatError
from vmtrace.format.fieldline import parse_field_line

try:  # the C page walk; optional: without it the numpy walk below does the same work
    from vmtrace.format import _walk
except ImportError:  # pragma: no cover - depends on the build
    _walk = None

# VMTRACE_WALKER=numpy forces the numpy walk (for comparisons); the default is C if built.
_WALKER = "numpy" if os.environ.get("VMTRACE_WALKER", "").lower() == "numpy" else "c"


def walker() -> str:
    """Which page walk :func:`decode_pages` uses: ``"c"`` or ``"numpy"``."""
    return "c" if _walk is not None and _WALKER == "c" else "numpy"

# Record types, as header_event names them (checked against the text when parsed).
TYPE_PADDING = 29
TYPE_TIME_EXTEND = 30
TYPE_TIME_STAMP = 31
DATA_MAX_TYPE_LEN = 28
TS_SHIFT = 27

# Flags in the commit word of a page (kernel RB_MISSED_EVENTS / RB_MISSED_STORED).
MISSED_EVENTS = 1 << 31
MISSED_STORED = 1 << 30
_COMMIT_FLAGS = MISSED_EVENTS | MISSED_STORED
# Absolute time stamps keep 59 bits; the kernel fills the rest from the running clock.
_TS_MSB = np.uint64(0xF8 << 56)

# Largest page we accept: the kernel's sub-buffers go up to a few MB; a header that
# claims more is corrupt, and we must not allocate for it.
MAX_PAGE_SIZE = 1 << 24

Buffer = Union[bytes, bytearray, memoryview]

# header_page/header_event are a few hundred bytes; a larger text is not the kernel's.
MAX_HEADER_TEXT = 64 << 10


@dataclass(frozen=True)
class PageLayout:
    """Where things are in a page and how record headers are packed.

    Built from the ``header_page`` and ``header_event`` texts, because their offsets
    depend on the guest's ``long`` size (the commit word is a ``local_t``) and on the
    sub-buffer size.
    """

    page_size: int = 4096
    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16
    endian: str = "little"
    type_len_bits: int = 5
    time_delta_bits: int = 27

    @property
    def data_size(self) -> int:
        return self.page_size - self.data_offset

    @property
    def byteorder(self) -> str:
        return "<" if self.endian == "little" else ">"


def _header_text(text: Union[str, bytes], source: str) -> str:
    if len(text) > MAX_HEADER_TEXT:
        raise FormatError(f"{len(text)} bytes, more than the {MAX_HEADER_TEXT} a kernel writes",
                          source=source)
    return text.decode("ascii", errors="replace") if isinstance(text, bytes) else text


def parse_header_page(text: Union[str, bytes], *, endian: str = "little",
                      page_size: Optional[int] = None, source: str = "header_page") -> PageLayout:
    """Read field offsets from ``events/header_page``.

    ``page_size`` (from trace.dat or meta.json) wins over ``data``'s offset+size, which
    describes the kernel's sub-buffer when the text was captured.
    """
    text = _header_text(text, source)
    fields = {}
    for line in text.splitlines():
        at = line.find("field:")
        fl = parse_field_line(line[at:]) if at >= 0 else None
        if fl is None or fl.offset < 0 or fl.size < 0:
            continue
        words = fl.decl.split()
        fields.setdefault(words[-1] if words else "", (fl.offset, fl.size))
    for need in ("timestamp", "commit", "data"):
        if need not in fields:
            raise FormatError(f"no '{need}' field", source=source)
    ts_off, ts_size = fields["timestamp"]
    c_off, c_size = fields["commit"]
    d_off, d_size = fields["data"]
    if ts_size != 8 or c_size not in (4, 8):
        raise FormatError(f"unsupported sizes: timestamp {ts_size}, commit {c_size}", source=source)
    psize = page_size if page_size else d_off + d_size
    endian = {"<": "little", ">": "big"}.get(endian, endian)
    if endian not in ("little", "big"):
        raise FormatError(f"bad endianness {endian!r}", source=source)
    if not (0 < psize <= MAX_PAGE_SIZE) or psize % 4:
        raise FormatError(f"bad page size {psize}", source=source)
    if ts_off + 8 > d_off or c_off + c_size > d_off or d_off % 4 or d_off >= psize:
        raise FormatError(f"inconsistent layout: timestamp@{ts_off} commit@{c_off} data@{d_off}",
                          source=source)
    return PageLayout(page_size=psize, timestamp_offset=ts_off, commit_offset=c_off,
                      commit_size=c_size, data_offset=d_off, endian=endian)


def check_header_event(text: Union[str, bytes], *, source: str = "header_event") -> None:
    """Refuse an event-header layout other than the one every kernel since 2.6.30 uses.

    The decoder hard-codes 5+27 bits and types 29/30/31; a different text means a
    different kernel ABI, better reported than silently misread.
    """
    text = _header_text(text, source)
    want = {
        r"type_len\s*:\s*(\d+)\s*bits": 5,
        r"time_delta\s*:\s*(\d+)\s*bits": 27,
        r"padding\s*:\s*type\s*==\s*(\d+)": TYPE_PADDING,
        r"time_extend\s*:\s*type\s*==\s*(\d+)": TYPE_TIME_EXTEND,
        r"time_stamp\s*:\s*type\s*==\s*(\d+)": TYPE_TIME_STAMP,
        r"data max type_len\s*==\s*(\d+)": DATA_MAX_TYPE_LEN,
    }
    for pattern, value in want.items():
        m = re.search(pattern, text)
        if m is None:
            # Old kernels lack the time_stamp line; everything else must be there.
            if "time_stamp" in pattern:
                continue
            raise FormatError(f"missing {pattern.split(chr(92))[0]!r}", source=source)
        if len(m.group(1)) > 3 or int(m.group(1)) != value:
            raise FormatError(f"unsupported {m.group(0)!r} (expected {value})", source=source)


def layout_from_headers(header_page: Union[str, bytes], header_event: Union[str, bytes], *,
                        endian: str = "little", page_size: Optional[int] = None) -> PageLayout:
    check_header_event(header_event)
    return parse_header_page(header_page, endian=endian, page_size=page_size)


class LostMark(NamedTuple):
    """Events the kernel dropped before event ``index`` of a batch (count -1: unknown)."""

    index: int
    count: int
    ts: int


class PageProblem(NamedTuple):
    """A page (or its tail) skipped in keep-going mode: where and why."""

    offset: int
    what: str


@dataclass
class EventBatch:
    """Events of one CPU in stream order; offsets point into ``data``."""

    cpu: int
    ts: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    type_id: np.ndarray
    data: Buffer
    lost: List[LostMark] = field(default_factory=list)
    problems: List[PageProblem] = field(default_factory=list)
    pages: int = 0

    def __len__(self) -> int:
        return int(self.ts.shape[0])

    def payload(self, i: int) -> memoryview:
        o = int(self.offset[i])
        return memoryview(self.data)[o:o + int(self.length[i])]

    @classmethod
    def empty(cls, cpu: int = 0) -> "EventBatch":
        return cls(cpu, np.zeros(0, np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int32),
                   np.zeros(0, np.uint16), b"")


# Problem codes found during the lockstep walk; turned into text only when reported.
_PROBLEMS = {
    1: "commit {v} is larger than the page's data area",
    2: "record header runs past the commit",
    3: "record of {v} bytes runs past the commit",
    4: "data record too short ({v} bytes) to hold an event type",
    5: "missed-events count does not fit after the commit",
}


def decode_pages(buf: Buffer, layout: PageLayout, cpu: int = 0, *, source: Optional[str] = None,
                 base_offset: int = 0, keep_going: bool = False) -> EventBatch:
    """Decode whole pages laid end to end in ``buf`` into one :class:`EventBatch`.

    ``base_offset`` is where ``buf`` starts in ``source`` so that errors name a file
    offset a user can look at with ``xxd``. The walk is done in C when the extension
    ``vmtrace.format._walk`` is built (see :func:`walker`), else with numpy; both give
    the same result for any bytes.
    """
    if _walk is not None and _WALKER == "c":
        return _decode_pages_c(buf, layout, cpu, source=source, base_offset=base_offset,
                               keep_going=keep_going)
    return _decode_pages_numpy(buf, layout, cpu, source=source, base_offset=base_offset,
                               keep_going=keep_going)


def _whole_pages(buf: Buffer, layout: PageLayout, base_offset: int, source: Optional[str],
                 keep_going: bool):
    """(bytes view, page count, problems) after checking for a partial last page."""
    ps = layout.page_size
    mv = memoryview(buf).cast("B") if not isinstance(buf, (bytes, bytearray)) else buf
    nbytes = len(mv)
    npages = nbytes // ps
    problems: List[PageProblem] = []
    if nbytes % ps:
        off = base_offset + npages * ps
        what = f"trailing {nbytes % ps} bytes are not a whole page of {ps}"
        if not keep_going:
            raise FormatError(what, source=source, offset=off)
        problems.append(PageProblem(off, what))
    return mv, npages, problems


def _decode_pages_c(buf: Buffer, layout: PageLayout, cpu: int = 0, *,
                    source: Optional[str] = None, base_offset: int = 0,
                    keep_going: bool = False) -> EventBatch:
    """:func:`decode_pages` with the C walk: one pass for per-page facts and the event
    count, a second one writing the events into arrays of exactly that size."""
    mv, npages, problems = _whole_pages(buf, layout, base_offset, source, keep_going)
    if npages == 0:
        b = EventBatch.empty(cpu)
        b.problems = problems
        return b
    args = (mv, npages, layout.page_size, layout.timestamp_offset, layout.commit_offset,
            layout.commit_size, layout.data_offset, layout.endian == "big")
    info = np.empty((npages, _walk.INFO_COLS), np.int64)
    n = _walk.pages(*args, info)
    codes = info[:, 1]
    first_bad = np.flatnonzero(codes)
    if first_bad.size:
        if not keep_going:
            bp = int(first_bad[0])
            raise FormatError(_problem_text(codes[bp], info[bp, 3]), source=source,
                              offset=base_offset + int(info[bp, 2]))
        for bp in first_bad.tolist():
            problems.append(PageProblem(base_offset + int(info[bp, 2]),
                                        _problem_text(codes[bp], info[bp, 3])))
    ts_out = np.empty(n, np.uint64)
    off_out = np.empty(n, np.int64)
    len_out = np.empty(n, np.int32)
    type_id = np.empty(n, np.uint16)
    if n:
        _walk.events(*args, n, ts_out, off_out, len_out, type_id)
    lost: List[LostMark] = []
    missed = np.flatnonzero(info[:, 5])
    if missed.size:
        starts = np.zeros(npages, np.int64)
        np.cumsum(info[:-1, 0], out=starts[1:])
        page_ts = info[:, 6].view(np.uint64)
        lost = [LostMark(int(starts[mp]), int(info[mp, 4]), int(page_ts[mp]))
                for mp in missed.tolist()]
    return EventBatch(cpu=cpu, ts=ts_out, offset=off_out, length=len_out, type_id=type_id,
                      data=mv, lost=lost, problems=problems, pages=npages)


def _decode_pages_numpy(buf: Buffer, layout: PageLayout, cpu: int = 0, *,
                        source: Optional[str] = None, base_offset: int = 0,
                        keep_going: bool = False) -> EventBatch:
    """:func:`decode_pages` in numpy: the fallback, and the oracle for the C walk."""
    ps = layout.page_size
    mv, npages, problems = _whole_pages(buf, layout, base_offset, source, keep_going)
    if npages == 0:
        b = EventBatch.empty(cpu)
        b.problems = problems
        return b
    bo = layout.byteorder
    u32 = np.dtype(bo + "u4")
    words = np.frombuffer(mv, dtype=u32, count=npages * ps // 4)
    page_ts = np.ndarray((npages,), dtype=np.dtype(bo + "u8"), buffer=mv,
                         offset=layout.timestamp_offset, strides=(ps,)).astype(np.uint64)
    cdt = np.dtype(bo + ("u8" if layout.commit_size == 8 else "u4"))
    commit = np.ndarray((npages,), dtype=cdt, buffer=mv, offset=layout.commit_offset,
                        strides=(ps,)).astype(np.uint64)
    # The kernel ORs the flags into a signed long, so on 64-bit guests they arrive
    # sign-extended (0xffffffffc0000fdc): only the low 32 bits carry meaning.
    commit &= np.uint64(0xFFFFFFFF)
    flags = commit & np.uint64(_COMMIT_FLAGS)
    size = (commit & ~np.uint64(_COMMIT_FLAGS)).astype(np.int64)
    page_start = np.arange(npages, dtype=np.int64) * ps
    data_start = page_start + layout.data_offset
    # Per page: first problem (code, byte offset within buf, value) or code 0.
    prob_code = np.zeros(npages, np.int8)
    prob_off = np.zeros(npages, np.int64)
    prob_val = np.zeros(npages, np.int64)
    bad_commit = size > layout.data_size
    prob_code[bad_commit] = 1
    prob_off[bad_commit] = page_start[bad_commit] + layout.commit_offset
    prob_val[bad_commit] = size[bad_commit]
    size[bad_commit] = 0
    end = data_start + size

    # The missed-events count sits right after the committed data when STORED is set.
    lost_count = np.zeros(npages, np.int64)
    missed = (flags & np.uint64(MISSED_EVENTS)) != 0
    stored = missed & ((flags & np.uint64(MISSED_STORED)) != 0) & ~bad_commit
    if stored.any():
        ls = layout.commit_size
        fits = size + ls <= layout.data_size
        bad = stored & ~fits
        prob_code[bad] = 5
        prob_off[bad] = end[bad]
        ok = np.nonzero(stored & fits)[0]
        if ok.size:
            raw = np.frombuffer(mv, np.uint8)
            idx = end[ok][:, None] + np.arange(ls)[None, :]
            vals = raw[idx].copy().view(np.dtype(bo + ("u8" if ls == 8 else "u4"))).reshape(-1)
            lost_count[ok] = np.minimum(vals, np.uint64(1 << 62)).astype(np.int64)
    lost_count[missed & ~stored] = -1

    pg = np.nonzero(~bad_commit)[0]      # pages still being walked (compacted state)
    p = data_start[pg] // 4              # word index of each page's next record header
    e = end[pg]                          # byte offset where each page's commit ends
    ts = page_ts[pg]                     # running clock of each page
    r = np.zeros(pg.shape[0], np.int64)  # records emitted so far, per page
    nwords = words.shape[0]
    out_pg: List[np.ndarray] = []
    out_rank: List[np.ndarray] = []
    out_off: List[np.ndarray] = []
    out_len: List[np.ndarray] = []
    out_ts: List[np.ndarray] = []
    little = layout.endian == "little"
    u64 = np.uint64

    def fail(mask: np.ndarray, code: int, here: np.ndarray, value: Optional[np.ndarray]) -> None:
        bi = pg[mask]
        prob_code[bi] = code
        prob_off[bi] = here[mask]
        if value is not None:
            prob_val[bi] = value[mask]

    while pg.size:
        here = p * 4
        live = here < e
        if not live.all():
            pg, p, e, ts, r, here = pg[live], p[live], e[live], ts[live], r[live], here[live]
            if not pg.size:
                break
        h = words[p]
        if little:
            tl = (h & 31).astype(np.int64)
            td = h >> 5
        else:
            tl = (h >> 27).astype(np.int64)
            td = h & 0x7FFFFFF
        special = (tl == 0) | (tl > DATA_MAX_TYPE_LEN)
        if not special.any():
            # Fast path: only small data records in this step (the common case).
            total = 4 * tl + 4
            over = here + total > e
            ts = ts + td
            if over.any():
                fail(over, 3, here, total)
                ok = ~over
                pg, p, e, ts, r, here, total = (pg[ok], p[ok], e[ok], ts[ok], r[ok], here[ok],
                                                 total[ok])
            out_pg.append(pg)
            out_rank.append(r)
            out_off.append(here + 4)
            out_len.append(total - 4)
            out_ts.append(ts)
            r = r + 1
            p = p + (total >> 2)
            continue
        # General path: big records (length in array[0]), padding, time extend/stamp.
        a0 = words[np.minimum(p + 1, nwords - 1)].astype(np.int64)
        big = tl == 0
        pad = tl == TYPE_PADDING
        null_pad = pad & (td == 0)
        is_data = tl <= DATA_MAX_TYPE_LEN
        a0r = (a0 + 3) & ~3
        total = np.where(special, np.where(big | pad, 4 + a0r, 8), 4 * tl + 4)
        plen = np.where(big, a0r - 4, 4 * tl)
        err = np.zeros(pg.shape[0], np.int8)
        e2 = special & ~null_pad & (here + 8 > e)
        err[e2] = 2
        e3 = ~e2 & ~null_pad & (here + total > e)
        err[e3] = 3
        e4 = ~e2 & ~e3 & is_data & (plen < 2)
        err[e4] = 4
        bad = err != 0
        if bad.any():
            for code, m, v in ((2, e2, None), (3, e3, total), (4, e4, plen)):
                if m.any():
                    fail(m, code, here, v)
        ok = ~bad & ~null_pad
        # Data and padding add their delta; an extend adds the long delta; a time stamp
        # sets the clock, taking the 5 bits it lacks from the running clock
        # (kernel rb_fix_abs_ts, libtraceevent TS_MSB).
        long_delta = td.astype(u64) | (a0.astype(u64) << u64(TS_SHIFT))
        new_ts = np.where(tl == TYPE_TIME_EXTEND, ts + long_delta, ts + td)
        stamp = tl == TYPE_TIME_STAMP
        if stamp.any():
            msb = ts & _TS_MSB
            abs_ts = long_delta | msb
            abs_ts = np.where((msb != 0) & (abs_ts < ts), abs_ts + u64(1 << 59), abs_ts)
            new_ts = np.where(stamp, abs_ts, new_ts)
        emit = ok & is_data
        if emit.any():
            out_pg.append(pg[emit])
            out_rank.append(r[emit])
            out_off.append(here[emit] + np.where(big[emit], 8, 4))
            out_len.append(plen[emit])
            out_ts.append(new_ts[emit])
        r = r + emit
        pg, p, e, ts, r = pg[ok], (p + (total >> 2))[ok], e[ok], new_ts[ok], r[ok]

    first_bad = np.nonzero(prob_code)[0]
    if first_bad.size:
        if not keep_going:
            bp = int(first_bad[0])
            raise FormatError(_problem_text(prob_code[bp], prob_val[bp]), source=source,
                              offset=base_offset + int(prob_off[bp]))
        for bp in first_bad.tolist():
            problems.append(PageProblem(base_offset + int(prob_off[bp]),
                                        _problem_text(prob_code[bp], prob_val[bp])))

    n = sum(a.shape[0] for a in out_pg)
    counts = np.zeros(npages, np.int64)
    ts_out = np.empty(n, np.uint64)
    off_out = np.empty(n, np.int64)
    len_out = np.empty(n, np.int32)
    if n:
        pages_all = np.concatenate(out_pg)
        counts = np.bincount(pages_all, minlength=npages)
        starts = np.zeros(npages, np.int64)
        np.cumsum(counts[:-1], out=starts[1:])
        dest = starts[pages_all] + np.concatenate(out_rank)
        ts_out[dest] = np.concatenate(out_ts)
        off_out[dest] = np.concatenate(out_off)
        len_out[dest] = np.concatenate(out_len)
        w = words[off_out >> 2]
        type_id = (w & 0xFFFF if little else w >> 16).astype(np.uint16)
    else:
        starts = np.zeros(npages, np.int64)
        type_id = np.zeros(0, np.uint16)
    lost = [LostMark(int(starts[mp]), int(lost_count[mp]), int(page_ts[mp]))
            for mp in np.nonzero(missed)[0].tolist()]
    return EventBatch(cpu=cpu, ts=ts_out, offset=off_out, length=len_out, type_id=type_id,
                      data=mv, lost=lost, problems=problems, pages=npages)


def _problem_text(code: int, value: int) -> str:
    return _PROBLEMS[int(code)].format(v=int(value))


def iter_batches(pages: Iterable[Buffer], layout: PageLayout, cpu: int = 0, *,
                 source: Optional[str] = None, keep_going: bool = False,
                 chunk_pages: int = 2048) -> Iterator[EventBatch]:
    """Decode a CPU's page stream in chunks, so memory stays bounded for any trace size.

    Pages may arrive one at a time or as larger runs of whole pages; both are joined into
    chunks of ``chunk_pages`` pages (8 MB at 4 KB pages).
    """
    ps = layout.page_size
    limit = max(1, chunk_pages) * ps
    # One fresh buffer per chunk, filled in place: a single copy of every page, and the
    # batch handed out keeps its own buffer (callers may hold on to it).
    chunk = bytearray(limit)
    fill = 0
    consumed = 0
    for piece in pages:
        n = len(piece)
        if fill + n > limit:
            if fill:
                whole = fill - fill % ps
                rest = bytes(chunk[whole:fill])
                yield decode_pages(memoryview(chunk)[:whole], layout, cpu, source=source,
                                   base_offset=consumed, keep_going=keep_going)
                consumed += whole
                chunk = bytearray(max(limit, n + len(rest)))
                chunk[:len(rest)] = rest
                fill = len(rest)
            if n > len(chunk) - fill:
                chunk = chunk[:fill] + bytearray(n + fill)
        chunk[fill:fill + n] = piece
        fill += n
    if fill:
        yield decode_pages(memoryview(chunk)[:fill], layout, cpu, source=source,
                           base_offset=consumed, keep_going=keep_going)
