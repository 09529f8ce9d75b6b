"""The few pieces of the protobuf wire format that the Perfetto writer needs.

Written here rather than taken from the ``protobuf`` package so that writing a trace
needs nothing beyond the standard library: ``protobuf`` and ``perfetto`` are only the
tests' oracle (their decoder and Perfetto's compiled schema read our bytes back).

The wire format (https://protobuf.dev/programming-guides/encoding/): a message is a
sequence of fields, each a key ``field_number << 3 | wire_type`` as a varint, then the
value. Only two wire types are used: VARINT (integers and bools, 7 bits a byte, low
bits first) and LEN (a varint length, then bytes: strings and sub-messages).
Negative ``int32``/``int64`` values are their 64-bit two's complement, so they always
take ten bytes (``sint*`` with zigzag would be shorter, but the Perfetto fields we write
are not declared ``sint``, and the decoder must read what the schema declares).
"""
from __future__ import annotations

from typing import Dict, Iterable, Tuple

VARINT = 0
LEN = 2

_U64 = (1 << 64) - 1

# The scalar types we write, with the values each can hold. A value outside the range
# is an error, not a silent truncation: the decoder would read a different number.
RANGES: Dict[str, Tuple[int, int]] = {
    "int32": (-(1 << 31), (1 << 31) - 1),
    "int64": (-(1 << 63), (1 << 63) - 1),
    "uint32": (0, (1 << 32) - 1),
    "uint64": (0, _U64),
    "bool": (0, 1),
}

# Single-byte varints, by far the most common (small field numbers, lengths, pids).
_SMALL = [bytes((i,)) for i in range(128)]


def varint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as a base-128 varint."""
    if 0 <= n < 128:
        return _SMALL[n]
    if n < 0 or n > _U64:
        raise ValueError("varint out of range: %d" % n)
    if n < 16384:
        return bytes(((n & 0x7F) | 0x80, n >> 7))
    out = []
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def key(field: int, wire_type: int) -> bytes:
    """The key that starts a field."""
    if field < 1 or field >= 1 << 29:
        raise ValueError("field number out of range: %d" % field)
    return varint(field << 3 | wire_type)


def fits(kind: str, value: object) -> bool:
    """Whether ``value`` can be written as the scalar type ``kind`` ("string" too)."""
    if kind == "string":
        return isinstance(value, str)
    if not isinstance(value, int):
        return False
    lo, hi = RANGES[kind]
    return lo <= value <= hi


def integer(field: int, kind: str, value: int) -> bytes:
    """An integer or bool field of scalar type ``kind`` (int32/int64/uint32/uint64/bool)."""
    if not fits(kind, value):
        raise ValueError("%r does not fit %s" % (value, kind))
    return key(field, VARINT) + varint(int(value) & _U64)


def text(s: str) -> bytes:
    """UTF-8 bytes of a string field's value. Protobuf strings must be valid UTF-8, so
    bytes kept undecoded by ``surrogateescape`` become U+FFFD (other lone surrogates "?")."""
    try:
        return s.encode("utf-8")
    except UnicodeEncodeError:
        try:
            raw = s.encode("utf-8", "surrogateescape")
        except UnicodeEncodeError:
            raw = s.encode("utf-8", "replace")
        return raw.decode("utf-8", "replace").encode("utf-8")


def string(field: int, s: str) -> bytes:
    return length_delimited(field, text(s))


def length_delimited(field: int, payload: bytes) -> bytes:
    """A LEN field: a sub-message's encoding, a string's bytes, or raw bytes."""
    return framed(key(field, LEN), payload)


def framed(field_key: bytes, payload: bytes) -> bytes:
    """A LEN field whose key was encoded once beforehand (the writer's hot path)."""
    return field_key + varint(len(payload)) + payload


def message(field: int, parts: Iterable[bytes]) -> bytes:
    """A sub-message made of already encoded fields."""
    return length_delimited(field, b"".join(parts))
