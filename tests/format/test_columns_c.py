"""The C field gathers (``_walk.gather`` in ``columns_at``, ``_walk.gather_types`` in
:func:`batch_columns`) against the numpy gather: the same columns (names, order, dtypes,
values) or the same FormatError, on real traces, on fuzzed pages and on short payloads."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import vmtrace
from vmtrace.errors import FormatError
from vmtrace.format import columns
from vmtrace.format.columns import batch_columns
from vmtrace.format.events import EventCatalog
from vmtrace.format.ringbuffer import decode_pages

from pages import LAYOUT, PageBuilder, payload

needs_c = pytest.mark.skipif(columns._gather_types is None, reason="the C gathers are not built")


def _numpy(fn, monkeypatch):
    with monkeypatch.context() as m:
        m.setattr(columns, "_gather", None)
        m.setattr(columns, "_gather_types", None)
        return _run(fn)


def _run(fn):
    try:
        return fn()
    except FormatError as e:
        return ("error", str(e), e.offset)


def _same_cols(a, b):
    assert list(a) == list(b)
    for k in a:
        x, y = a[k], b[k]
        assert x.dtype == y.dtype and x.shape == y.shape, k
        if x.dtype == object:
            assert x.tolist() == y.tolist(), k
        else:
            assert np.array_equal(x, y), k


def _same_parts(a, b):
    if isinstance(a, tuple) or isinstance(b, tuple):
        assert a == b
        return
    assert [f.id for f, _, _ in a] == [f.id for f, _, _ in b]
    for (_, sa, ca), (_, sb, cb) in zip(a, b):
        assert np.array_equal(sa, sb)
        _same_cols(ca, cb)


def _compare_batch(batch, catalog, monkeypatch):
    for common in (False, True):
        for strings in ("str", "bytes"):
            for kg in (False, True):
                fn = lambda: batch_columns(batch, catalog, common=common, keep_going=kg,
                                           strings=strings)
                _same_parts(_run(fn), _numpy(fn, monkeypatch))
                parts = _run(fn)
                if isinstance(parts, tuple):
                    continue
                for fmt, sel, cols in parts[:4]:   # columns() (the gather path) too
                    fn2 = lambda: fmt.columns(batch, sel, common=common, keep_going=kg,
                                              strings=strings)
                    got = _run(fn2)
                    _same_cols(got, cols)
                    _same_cols(got, _numpy(fn2, monkeypatch))


@needs_c
def test_checked_in_traces(data_dir, monkeypatch):
    for name in ("tracedat_small_v6.dat", "tracedat_small_v7.dat"):
        with vmtrace.open(data_dir / name) as tr:
            for cpu in tr.cpus():
                for batch in tr.batches(cpu):
                    _compare_batch(batch, tr.catalog, monkeypatch)


@needs_c
@pytest.mark.tracefs
@pytest.mark.oracle
def test_real_trace_of_13_systems(tmp_path, monkeypatch):
    import os
    import realtrace
    from realtrace import SYSTEMS
    out = realtrace.record_tracedat(tmp_path / "rich.dat", events=SYSTEMS, buffer_kb=256,
                                    instance=f"vmtrace-cols-{os.getpid()}")
    kinds = set()
    with vmtrace.open(out) as tr:
        for cpu in tr.cpus():
            for batch in tr.batches(cpu):
                _compare_batch(batch, tr.catalog, monkeypatch)
                for t in np.unique(batch.type_id).tolist():
                    fmt = tr.catalog.get(t)
                    kinds |= {f.kind for f in fmt.fields} if fmt else set()
    assert {"scalar", "string", "dynstr"} <= kinds


def _catalog():
    cat = EventCatalog()
    cat.add("fuzz", FMT_TEXT)
    cat.add("fuzz", SMALL_TEXT)
    return cat


FMT_TEXT = (
    "name: fuzz\nID: 1\nformat:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
    "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
    "\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;\n"
    "\tfield:__rel_loc u32[] vals;\toffset:12;\tsize:4;\tsigned:0;\n"
    "\tfield:char comm[16];\toffset:16;\tsize:16;\tsigned:0;\n"
    "\tfield:long n;\toffset:32;\tsize:8;\tsigned:1;\n"
    "\tfield:u16 arr[3];\toffset:40;\tsize:6;\tsigned:0;\n"
    "\tfield:char tail[];\toffset:46;\tsize:0;\tsigned:0;\n"
    "\nprint fmt: \"%s\", __get_str(name)\n")
SMALL_TEXT = (
    "name: small\nID: 2\nformat:\n"
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
    "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
    "\tfield:int x;\toffset:4;\tsize:4;\tsigned:1;\n"
    "\tfield:char c[5];\toffset:8;\tsize:5;\tsigned:0;\n"
    "\nprint fmt: \"%d\", REC->x\n")


def _seed():
    b = PageBuilder(10)
    for i in range(12):
        if i % 3 == 0:
            b.data(struct.pack("<HBBi", 2, 1, 0, i) + b"ab\0cd" + b"\0" * 3)
        elif i % 3 == 1:
            name = b"kmalloc-%d\0" % (32 << i)
            body = struct.pack("<HBBiIIQ", 1, 0, 0, i, (len(name) << 16) | 48, (8 << 16) | 4,
                               0)[:16] + b"comm-%02d\0\0\0\0\0\0\0\0\0" % i
            body = body[:32] + struct.pack("<q", -i) + struct.pack("<HHH", 1, 2, 3) + b"xy"
            body += name + struct.pack("<II", 7, 8)
            b.data(body, delta=1)
        else:
            b.data(payload(99, i), delta=2)   # a type the catalog does not know
    return b.page()


@needs_c
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(16, 600), st.integers(0, 255)), max_size=12))
def test_fuzzed_payloads_same_columns(edits):
    page = bytearray(_seed())
    for pos, val in edits:
        page[pos] = val
    batch = decode_pages(bytes(page), LAYOUT, keep_going=True)
    mp = pytest.MonkeyPatch()
    try:
        _compare_batch(batch, _catalog(), mp)
    finally:
        mp.undo()


@needs_c
def test_short_payloads_and_bad_arguments(monkeypatch):
    batch = decode_pages(_seed(), LAYOUT)
    # Shorten one payload of each known type: strict mode raises what columns() raises.
    batch.length = batch.length.copy()
    batch.length[0] = 4
    batch.length[1] = 20
    _compare_batch(batch, _catalog(), monkeypatch)
    with pytest.raises(ValueError):
        columns._gather(b"abc", np.zeros(2, np.int64), np.zeros(1, np.int32), 4, [])
    col = np.empty(2, np.uint32)
    with pytest.raises(ValueError):
        columns._gather(b"abcdefgh", np.zeros(2, np.int64), np.full(2, 8, np.int32), 4,
                   [(2, 4, 0, col), ])                                   # past the span
    with pytest.raises(ValueError):
        columns._gather(b"abcdefgh", np.zeros(3, np.int64), np.full(3, 8, np.int32), 4,
                   [(0, 4, 0, col)])                                     # output too small
    n = columns._gather(b"abcdefgh", np.array([0, 6, -1], np.int64), np.array([8, 8, 8], np.int32),
                   4, [(0, 4, 0, np.empty(3, np.uint32))])
    assert n == 3
    sel = np.empty(1, np.int64)
    with pytest.raises(ValueError):   # more events of the type than the plan has room for
        columns._gather_types(b"abcdefgh", np.zeros(2, np.int64), np.full(2, 8, np.int32),
                         np.zeros(2, np.uint16), [(0, 4, sel, [])])
