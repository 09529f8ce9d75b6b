"""The control protocol: framing, plain seed orders, resynchronisation, metadata packing."""
from __future__ import annotations

import json
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vmtrace import protocol as P


def feed_bytewise(data: bytes, allow_orders: bool = True):
    dec = P.Decoder(allow_orders=allow_orders)
    out = []
    for i in range(len(data)):
        out.extend(dec.feed(data[i: i + 1]))
    return out, dec


def test_roundtrip_every_message_type_whole_and_bytewise():
    msgs = [P.Message(t, {"seq": i, "s": "x" * i}, bytes([i]) * i) for i, t in enumerate(sorted(P.NAMES))]
    stream = b"".join(P.encode(m) for m in msgs)
    assert P.Decoder().feed(stream) == msgs
    items, dec = feed_bytewise(stream)
    assert items == msgs and dec.pending == 0


def test_header_layout_is_the_documented_one():
    raw = P.encode(P.msg("stats", blob=b"ab", seq=1))
    magic, ver, typ, flags, jlen, blen = struct.unpack_from("<4sBBHII", raw)
    assert (magic, ver, typ, flags, blen) == (b"VMTR", 1, P.STATS, 0, 2)
    assert json.loads(raw[16:16 + jlen]) == {"seq": 1} and raw[16 + jlen:] == b"ab"


def test_plain_orders_as_the_seed_host_writes_them():
    dec = P.Decoder()
    assert dec.feed(P.PLAIN_START) == [P.Order(True)]
    assert dec.feed(b"0\n") == [P.Order(False)]
    assert dec.feed(b"1") == [P.Order(True)]  # no newline
    assert dec.feed(b"\n\r\n 0\r\n") == [P.Order(False)]


def test_orders_and_frames_mix_on_one_stream():
    hello = P.encode(P.msg("hello", version=1))
    items = P.Decoder().feed(b"1\n" + hello + b"0\n" + hello)
    assert items == [P.Order(True), P.msg("hello", version=1), P.Order(False), P.msg("hello", version=1)]


def test_host_decoder_rejects_plain_text():
    items = P.Decoder(allow_orders=False).feed(b"1\n" + P.encode(P.msg("ok", re="x")))
    assert isinstance(items[0], P.ProtocolError)
    assert items[-1] == P.msg("ok", re="x")


@pytest.mark.parametrize("bad, what", [
    (b"hello there\n", "unknown plain order"),
    (P.HEADER.pack(b"VMTR", 1, P.HELLO, 0, 3, 0) + b"{x}", "does not parse"),
    (P.HEADER.pack(b"VMTR", 1, P.HELLO, 0, 2, 0) + b"[]", "not an object"),
    (P.HEADER.pack(b"VMTR", 1, 99, 0, 2, 0) + b"{}", "unknown message type 99"),
    (P.HEADER.pack(b"VMTR", 7, P.HELLO, 0, 2, 0) + b"{}", "unsupported protocol version 7"),
    (P.HEADER.pack(b"VMTR", 1, P.HELLO, 0, 0xFFFFFFFF, 0), "frame too large"),
    (P.HEADER.pack(b"VMTR", 1, P.HELLO, 0, 2, 0) + b"\xff\xfe", "does not parse"),
    (b"x" * 300, "unknown plain order"),
])
def test_malformed_input_is_reported_and_the_stream_recovers(bad, what):
    good = P.encode(P.msg("stats"))
    items = P.Decoder().feed(bad + good + b"1\n")
    errors = [i for i in items if isinstance(i, P.ProtocolError)]
    assert errors and what in str(errors[0])
    assert "offset 0" in str(errors[0])
    assert items[-2:] == [P.msg("stats"), P.Order(True)]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600), st.integers(min_value=1, max_value=64))
def test_random_bytes_never_raise_and_memory_stays_bounded(data, chunk):
    dec = P.Decoder()
    for i in range(0, len(data), chunk):
        for item in dec.feed(data[i:i + chunk]):
            assert isinstance(item, (P.Message, P.Order, P.ProtocolError))
    assert dec.pending <= P.HEADER_SIZE + P.MAX_JSON + P.MAX_BLOB


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=200))
def test_a_good_frame_after_garbage_without_magic_is_found(garbage):
    garbage = garbage.replace(b"VMTR", b"").replace(b"V", b"v")
    msgs = P.Decoder().feed(garbage + b"\n" + P.encode(P.msg("bye")))
    assert msgs[-1] == P.msg("bye")


def test_metadata_files_roundtrip_and_validation():
    files = {"header_page": b"hp", "events/sched/sched_switch/format": b"fmt", "kallsyms.gz": b"\x1f\x8b"}
    m = P.pack_files(files, note=1)
    back = P.Decoder(allow_orders=False).feed(P.encode(m))[0]
    assert P.unpack_files(back) == files
    with pytest.raises(P.ProtocolError, match="not allowed"):
        P.pack_files({"../etc/passwd": b""})
    evil = P.Message(P.METADATA, {"files": [["events/a/../../x/format", 1]]}, b"x")
    with pytest.raises(P.ProtocolError, match="not allowed"):
        P.unpack_files(evil)
    with pytest.raises(P.ProtocolError, match="overruns"):
        P.unpack_files(P.Message(P.METADATA, {"files": [["header_page", 5]]}, b"abc"))
    with pytest.raises(P.ProtocolError, match="not named"):
        P.unpack_files(P.Message(P.METADATA, {"files": [["header_page", 1]]}, b"abc"))
    with pytest.raises(P.ProtocolError, match="not \\[name, size\\]"):
        P.unpack_files(P.Message(P.METADATA, {"files": [["header_page", True]]}, b"a"))


def test_require_checks_json_types():
    m = P.msg("configure", buffer_percent=True, clock="mono")
    with pytest.raises(P.ProtocolError, match="wrong type"):
        P.require(m, "buffer_percent", int)
    assert P.require(m, "clock", str) == "mono"
    assert P.require(m, "events", list, optional=True) is None
    with pytest.raises(P.ProtocolError, match="lacks"):
        P.require(m, "events", list)


def test_an_endless_line_is_dropped_not_buffered():
    dec = P.Decoder()
    items = dec.feed(b"x" * (P.MAX_LINE + 10))
    assert len(items) == 1 and "longer than" in str(items[0]) and dec.pending == 0
    assert dec.feed(b"1\n") == [P.Order(True)]


def test_iter_frames_rejects_truncation():
    data = P.encode(P.msg("hello"))
    assert list(P.iter_frames(data)) == [P.msg("hello")]
    with pytest.raises(P.ProtocolError, match="truncated"):
        list(P.iter_frames(data[:-1]))
