"""The C page walk (``vmtrace.format._walk``) against its oracle, the numpy walk.

For any bytes both must give the same events (ts, offset, length, type id, dtypes),
lost marks, problems and page count, or the same FormatError (text, source, offset):
on hand-built pages of every record kind, on corrupt pages, on other layouts (big
endian, 32-bit commit words, other page sizes), on hypothesis-built and mutated pages,
and on real traces of many subsystems with dropped events.
"""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vmtrace
from vmtrace.errors import FormatError
from vmtrace.format import ringbuffer as rb
from vmtrace.format.ringbuffer import (MISSED_EVENTS, MISSED_STORED, PageLayout,
                                       _decode_pages_c, _decode_pages_numpy)

from pages import LAYOUT, PageBuilder, payload

needs_c = pytest.mark.skipif(rb._walk is None, reason="the C walker is not built")

LAYOUTS = [
    LAYOUT,
    PageLayout(page_size=4096, commit_size=4, data_offset=12),            # 32-bit guest
    PageLayout(endian="big"),
    PageLayout(page_size=4096, commit_size=4, data_offset=12, endian="big"),
    PageLayout(page_size=64),
    PageLayout(page_size=8192),
]


def run(fn, buf, layout, keep_going):
    try:
        return fn(buf, layout, 2, source="src", base_offset=4096, keep_going=keep_going)
    except FormatError as e:
        return ("error", str(e), e.source, e.offset)


def assert_same(buf, layout=LAYOUT):
    for keep_going in (False, True):
        a = run(_decode_pages_c, buf, layout, keep_going)
        b = run(_decode_pages_numpy, buf, layout, keep_going)
        if isinstance(a, tuple) or isinstance(b, tuple):
            assert a == b
            continue
        assert a.cpu == b.cpu and a.pages == b.pages
        for name in ("ts", "offset", "length", "type_id"):
            x, y = getattr(a, name), getattr(b, name)
            assert x.dtype == y.dtype, name
            assert np.array_equal(x, y), name
        assert a.lost == b.lost
        assert a.problems == b.problems
        assert bytes(a.data) == bytes(b.data)
    return a


class Builder:
    """Records of any kind for any layout (endianness, commit size, page size)."""

    def __init__(self, layout: PageLayout, ts: int):
        self.lay, self.ts, self.body = layout, ts, bytearray()
        self.o = "<" if layout.endian == "little" else ">"

    def word(self, v: int) -> "Builder":
        self.body += struct.pack(self.o + "I", v & 0xFFFFFFFF)
        return self

    def hdr(self, tl: int, delta: int) -> "Builder":
        delta &= (1 << 27) - 1
        return self.word((delta << 5) | tl if self.o == "<" else (tl << 27) | delta)

    def data(self, type_id: int, extra: bytes = b"", delta: int = 0, big: bool = False):
        p = struct.pack(self.o + "HBBi", type_id, 0, 0, 7) + extra
        p += b"\0" * (-len(p) % 4)
        if len(p) <= 112 and not big:
            self.hdr(len(p) // 4, delta)
        else:
            self.hdr(0, delta).word(len(p) + 4)
        self.body += p
        return self

    def extend(self, delta: int):
        return self.hdr(30, delta).word(delta >> 27)

    def stamp(self, ts: int):
        return self.hdr(31, ts).word(ts >> 27)

    def discarded(self, nbytes: int, delta: int = 1):
        self.hdr(29, delta).word(nbytes - 4)
        self.body += b"\xee" * (nbytes - 8)
        return self

    def page(self, *, null_pad=False, missed=0, commit=None, flags=0) -> bytes:
        lay = self.lay
        body = bytes(self.body)
        if null_pad:
            body += struct.pack(self.o + "I", 29 if self.o == "<" else 29 << 27)
        size = len(body) if commit is None else commit
        tail = b""
        if missed:
            flags |= MISSED_EVENTS
            if missed > 0:
                flags |= MISSED_STORED
                tail = struct.pack(self.o + ("Q" if lay.commit_size == 8 else "I"),
                                   missed % 2 ** (8 * lay.commit_size))
        word = size | flags
        if lay.commit_size == 8 and word & (1 << 31):
            word |= 0xFFFFFFFF00000000
        head = bytearray(lay.data_offset)
        head[lay.timestamp_offset:lay.timestamp_offset + 8] = struct.pack(self.o + "Q", self.ts)
        head[lay.commit_offset:lay.commit_offset + lay.commit_size] = struct.pack(
            self.o + ("Q" if lay.commit_size == 8 else "I"), word & (2 ** (8 * lay.commit_size) - 1))
        page = (bytes(head) + body + tail)[:lay.page_size]
        return page + b"\0" * (lay.page_size - len(page))


def every_kind(lay: PageLayout, ts: int = 1_000_000) -> Builder:
    return (Builder(lay, ts).data(7, delta=5).extend(1 << 30)
            .data(8, b"x" * 200, delta=3).discarded(24, delta=2).data(9, delta=1)
            .stamp(5_000_000_000).data(10, delta=4).data(11, b"y" * 20, big=True))


def test_walker_name():
    assert rb.walker() in ("c", "numpy")
    if rb._walk is not None and os.environ.get("VMTRACE_WALKER", "") != "numpy":
        assert rb.walker() == "c"


@needs_c
@pytest.mark.parametrize("lay", LAYOUTS, ids=lambda l: f"{l.endian}-{l.commit_size}-{l.page_size}")
def test_every_record_kind_and_page_flag(lay):
    big_page = lay.page_size >= 1024
    pages = []
    if big_page:
        pages.append(every_kind(lay).page(null_pad=True))
        pages.append(every_kind(lay, 9).page(missed=42))
        pages.append(every_kind(lay, 10).page(missed=-1))
    pages.append(Builder(lay, 400).page())                                  # empty page
    pages.append(Builder(lay, 500).data(1).data(2, delta=3).page(missed=5))
    pages.append(Builder(lay, 600).data(1).page(commit=lay.data_size + 1))    # bad commit
    pages.append(Builder(lay, 700).data(1).page(commit=lay.data_size + 1, missed=3))
    pages.append(Builder(lay, 800).data(1).page(commit=lay.data_size - 2, missed=3))
    pages.append(Builder(lay, 900).data(1).page(commit=6))                   # header cut
    pages.append(Builder(lay, 1000).extend(5).page(commit=4))                # extend cut
    pages.append(Builder(lay, 1100).word(0).word(4).page())                  # big too short
    pages.append(Builder(lay, 1200).word(0).word(0).page())                  # big of length 0
    pages.append(Builder(lay, 1300).word(0).word(4000).page())               # big past commit
    pages.append(Builder(lay, 1400).hdr(29, 0).data(3).page())               # null padding first
    pages.append(Builder(lay, 1500).data(1).page(flags=MISSED_STORED))       # STORED alone
    for p in pages:
        assert_same(p, lay)
    b = assert_same(b"".join(pages), lay)
    if big_page and lay is LAYOUT:
        # The hand-computed times of test_ringbuffer's every-kind test, in both walks.
        t1 = 1_000_005
        t2 = t1 + (1 << 30) + 3
        assert b.ts.tolist()[:5] == [t1, t2, t2 + 3, 5_000_000_004, 5_000_000_004]
    assert_same(b"".join(pages) + b"\1\2\3", lay)                           # trailing bytes
    assert_same(b"", lay)


@needs_c
def test_absolute_time_stamp_top_bits():
    # The running clock has top bits the stamp lacks; a stamp lower than the clock
    # wraps into the next 2**59 period (kernel rb_fix_abs_ts).
    high = (0b10101 << 59) | 12345
    for stamp in (1, 12345, 1 << 58, (1 << 59) - 1):
        page = Builder(LAYOUT, high).data(1).stamp(stamp).data(2, delta=1).page()
        b = assert_same(page)
        assert b.ts.tolist()[1] == (_fix(high, stamp)) + 1


def _fix(clock: int, stamp: int) -> int:
    msb = clock & (0x1F << 59)
    v = stamp | msb
    if msb and v < clock:
        v += 1 << 59
    return v & (2 ** 64 - 1)


@needs_c
def test_delta_wraps_like_numpy():
    page = Builder(LAYOUT, 2 ** 64 - 3).data(1, delta=10).extend(2 ** 40).data(2).page()
    assert_same(page)


@needs_c
def test_same_errors_as_numpy_for_test_ringbuffer_corruptions():
    good = PageBuilder(50).data(payload(1, 1)).data(payload(2, 2), delta=1).page()
    for bad in (good[:8] + struct.pack("<Q", 5000) + good[16:],
                good[:8] + struct.pack("<Q", 10) + good[16:],
                good[:16] + struct.pack("<II", 0, 4000) + good[24:],
                good[:16] + struct.pack("<II", 0, 4) + good[24:],
                good[:-1]):
        assert_same(good + bad + good)


@needs_c
def test_bad_arguments_are_refused():
    info = np.empty((1, rb._walk.INFO_COLS), np.int64)
    page = bytes(4096)
    with pytest.raises(ValueError):
        rb._walk.pages(page, 2, 4096, 0, 8, 8, 16, False, info)          # more pages than bytes
    with pytest.raises(ValueError):
        rb._walk.pages(page, 1, 4096, 0, 8, 8, 16, False, np.empty(3, np.int64))
    with pytest.raises(ValueError):
        rb._walk.pages(page, 1, 4096, 0, 8, 3, 16, False, info)          # commit size
    with pytest.raises(ValueError):
        rb._walk.pages(page, 1, 4096, 0, 8, 8, 4096, False, info)        # data offset
    page = Builder(LAYOUT, 1).data(1).data(2).page()
    assert rb._walk.pages(page, 1, 4096, 0, 8, 8, 16, False, info) == 2
    small = [np.empty(1, np.uint64), np.empty(1, np.int64), np.empty(1, np.int32),
             np.empty(1, np.uint16)]
    with pytest.raises(ValueError):
        rb._walk.events(page, 1, 4096, 0, 8, 8, 16, False, 2, *small)    # outputs too small
    with pytest.raises(ValueError):
        rb._walk.events(page, 1, 4096, 0, 8, 8, 16, False, 1, *small)    # count differs


# -- hypothesis ------------------------------------------------------------------------

_record = st.one_of(
    st.tuples(st.just("data"), st.integers(0, 0xFFFF), st.integers(0, 150), st.integers(0, 2 ** 27 - 1),
              st.booleans()),
    st.tuples(st.just("extend"), st.integers(0, 2 ** 59 - 1)),
    st.tuples(st.just("stamp"), st.integers(0, 2 ** 59 - 1)),
    st.tuples(st.just("discarded"), st.integers(2, 40).map(lambda k: 4 * k), st.integers(1, 9)),
    st.tuples(st.just("null")),
    st.tuples(st.just("word"), st.integers(0, 2 ** 32 - 1)),
)


def _build(lay, ts, records, commit_delta, missed):
    b = Builder(lay, ts)
    for r in records:
        kind = r[0]
        if kind == "data":
            b.data(r[1], b"z" * r[2], delta=r[3], big=r[4])
        elif kind == "extend":
            b.extend(r[1])
        elif kind == "stamp":
            b.stamp(r[1])
        elif kind == "discarded":
            b.discarded(r[1], r[2])
        elif kind == "null":
            b.hdr(29, 0)
        else:
            b.word(r[1])
    size = max(0, len(b.body) + commit_delta)
    return b.page(commit=size, missed=missed)


_page = st.tuples(st.integers(0, 2 ** 64 - 1), st.lists(_record, max_size=30),
                  st.sampled_from([0, 0, 0, -1, -3, -4, 2, 4, 5000]),
                  st.sampled_from([0, 0, 7, -1, 2 ** 63]))


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(LAYOUTS), st.lists(_page, min_size=1, max_size=4))
def test_built_pages_same_in_both(lay, pages):
    assert_same(b"".join(_build(lay, *p) for p in pages), lay)


_SEED = b"".join([
    every_kind(LAYOUT).page(null_pad=True),
    Builder(LAYOUT, 20).data(4).stamp(1 << 40).data(5, delta=3).page(missed=9),
    Builder(LAYOUT, 30).data(4).page(missed=-1),
])


@needs_c
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SEED) - 1), st.integers(0, 255)), max_size=24),
       st.sampled_from(LAYOUTS[:4]))
def test_mutated_pages_same_in_both(edits, lay):
    buf = bytearray(_SEED)
    for pos, val in edits:
        buf[pos] = val
    assert_same(bytes(buf), lay)


@needs_c
@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3 * 4096 + 7), st.sampled_from(LAYOUTS))
def test_random_bytes_same_in_both(data, lay):
    assert_same(data, lay)


@needs_c
def test_header_words_of_every_type_and_delta():
    # Every type_len with small and extreme deltas and array words, one record per page.
    pages = []
    for tl in range(32):
        for delta in (0, 1, 2 ** 27 - 1):
            for a0 in (0, 1, 4, 5, 8, 4076, 4080, 2 ** 32 - 1):
                b = Builder(LAYOUT, 77).hdr(tl, delta).word(a0)
                b.body += bytes(range(40))
                pages.append(b.page(commit=len(b.body)))
    assert_same(b"".join(pages))


# -- real traces -----------------------------------------------------------------------

def _chunks_same(path):
    n = lost = 0
    with vmtrace.open(path) as tr:
        for buf in tr.source.buffers:
            for c in buf.cpus:
                for chunk in c.chunks(64 * tr.layout.page_size):
                    b = assert_same(bytes(chunk), tr.layout)
                    n += len(b)
                    lost += len(b.lost)
    return n, lost


@needs_c
def test_checked_in_traces_same_in_both(data_dir):
    for name in ("tracedat_small_v6.dat", "tracedat_small_v7.dat"):
        n, _ = _chunks_same(data_dir / name)
        assert n > 100


@needs_c
@pytest.mark.tracefs
@pytest.mark.oracle
def test_real_trace_of_13_systems_with_drops_same_in_both(tmp_path):
    import realtrace
    from realtrace import SYSTEMS
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    out = realtrace.record_tracedat(tmp_path / "rich.dat", events=SYSTEMS, buffer_kb=256,
                                    instance=f"vmtrace-walk-{os.getpid()}")
    n, lost = _chunks_same(out)
    assert n > 1000
    # The whole trace through the public API, one walker against the other.
    with vmtrace.open(out) as tr:
        names = {tr.catalog.get(int(t)).system for c in tr.cpus() for b in tr.batches(c)
                 for t in np.unique(b.type_id) if tr.catalog.get(int(t))}
    assert len(names) >= 8, names
    assert lost > 0, "the small buffer should have overflowed"
