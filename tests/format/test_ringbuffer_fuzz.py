"""Guest pages are untrusted: whatever the bytes, decoding ends with events or one
FormatError, never another exception, a hang or an out-of-bounds offset."""
from __future__ import annotations

import struct

import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

from vmtrace.errors import FormatError
from vmtrace.format.ringbuffer import decode_pages

from pages import FMT, LAYOUT, PageBuilder, payload

_SEED = b"".join([
    PageBuilder(10).data(payload(1, 1)).extend(1 << 28).data(payload(2, 2, b"y" * 150))
    .discarded(16).stamp(1 << 33).data(payload(3, 3), delta=7).page(null_pad=True),
    PageBuilder(20).data(payload(4, 4)).page(missed=9),
])

def _check(batch, nbytes):
    assert len(batch.ts) == len(batch.offset) == len(batch.length) == len(batch.type_id)
    if len(batch):
        assert (batch.offset >= 0).all() and (batch.length >= 2).all()
        assert int((batch.offset + batch.length).max()) <= nbytes
    for m in batch.lost:
        assert 0 <= m.index <= len(batch)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_SEED) - 1), st.integers(0, 255)), max_size=24))
def test_mutated_pages_decode_or_fail_cleanly(edits):
    buf = bytearray(_SEED)
    for pos, val in edits:
        buf[pos] = val
    data = bytes(buf)
    try:
        _check(decode_pages(data, LAYOUT, source="fuzz"), len(data))
    except FormatError as e:
        assert e.source == "fuzz" and e.offset is not None and 0 <= e.offset <= len(data)
    batch = decode_pages(data, LAYOUT, keep_going=True)
    _check(batch, len(data))
    for i in range(len(batch)):
        try:
            FMT.decode(batch.payload(i))
        except FormatError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=3 * 4096 + 7))
def test_random_bytes(data):
    batch = decode_pages(data, LAYOUT, keep_going=True)
    _check(batch, len(data))
    if len(batch):
        sel = np.arange(len(batch))
        cols = FMT.columns(batch, sel, keep_going=True)
        assert all(len(v) == len(batch) for v in cols.values())


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=0, max_size=64))
def test_random_payloads_decode_or_fail_cleanly(body):
    try:
        FMT.decode(struct.pack("<HBBi", 1, 0, 0, 1) + body)
    except FormatError:
        pass
