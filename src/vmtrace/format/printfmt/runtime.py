"""Functions the generated Python calls while rendering an event, and their namespace.

Each is small and total: a guest's payload may hold any value, and an odd one must give
odd text, never an exception that stops the report. The payload readers live here
rather than with :mod:`.fields` because they are called at render time like the other
helpers, and :data:`_HELPERS` (the generated code's globals) must name them all.
"""
from __future__ import annotations

import struct
from typing import Any

from vmtrace.format.printfmt.limits import M64, MAX_HEX_BYTES, MAX_WIDTH


def _s(v: int, bits: int) -> int:
    v &= (1 << bits) - 1
    return v - (1 << bits) if v >> (bits - 1) else v


def _width(v: int) -> int:
    """A '*' width or precision from the payload, as C's int, within +-MAX_WIDTH."""
    return max(-MAX_WIDTH, min(MAX_WIDTH, _s(v, 32)))


def _ptr(v: Any) -> str:
    if not isinstance(v, int):
        return "(nil)"
    v &= M64
    return "0x%x" % v if v else "(nil)"


def _alt_hex(v: int, spec: str) -> str:
    """C's '#' flag: 0x only for non-zero values (Python always adds it)."""
    return (spec % v) if v else (spec.replace("#", "") % 0)



def _flags(val: Any, delim: str, table: tuple) -> str:
    if not isinstance(val, int):
        return ""
    val = _s(val, 64)
    out = []
    for fval, name in table:
        if not val and fval < 0:    # libtraceevent's rule, so an unknown name shows for 0
            out.append(name)
            break
        if fval > 0 and (val & fval) == fval:
            out.append(name)
            val &= ~fval
    if val:
        out.append("0x%x" % (val & M64))
    return delim.join(out)


def _symbolic(val: Any, table: dict) -> str:
    if not isinstance(val, int):
        return ""
    v = _s(val, 64)
    name = table.get(v)
    if name is None:
        return "0x%x" % (v & M64)
    return name


def _as_bytes(v: Any, elsize: int) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        return v.encode("latin-1", "replace")
    if isinstance(v, (list, tuple)):
        if elsize <= 1:
            return bytes(x & 0xFF for x in v)
        mask = (1 << (8 * elsize)) - 1
        return b"".join((x & mask).to_bytes(elsize, "little") for x in v)
    if isinstance(v, int):
        return (v & M64).to_bytes(8, "little")
    return b""


def _hex(v: Any, elsize: int, n: Any, sep: str) -> str:
    data = _as_bytes(v, elsize)
    n = n if isinstance(n, int) else 0
    n = max(0, min(n, len(data), MAX_HEX_BYTES))
    return sep.join("%02x" % b for b in data[:n])


def _array(v: Any, elsize: int, count: Any, el: Any) -> str:
    data = _as_bytes(v, elsize)
    count = count if isinstance(count, int) else 0
    el = el if isinstance(el, int) else 1
    if el not in (1, 2, 4, 8):
        return "{BAD SIZE:%d 0x%x}" % (el, data[0] if data else 0)
    count = max(0, min(count, len(data) // el, MAX_HEX_BYTES))
    return "{" + ",".join("0x%x" % int.from_bytes(data[i * el:(i + 1) * el], "little")
                          for i in range(count)) + "}"


def _bitmask(v: Any, elsize: int) -> str:
    """A bitmask as the kernel's %*pb: 32-bit hex words, most significant first."""
    data = _as_bytes(v, elsize)
    words = [int.from_bytes(data[i:i + 4].ljust(4, b"\0"), "little") for i in range(0, len(data), 4)]
    if not words:
        return ""
    words.reverse()
    first = "%x" % words[0]
    return ",".join([first] + ["%08x" % w for w in words[1:]])


def _mac(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 6:
        return ""
    return ":".join("%02x" % b for b in data[:6])


def _ip4(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 4:
        return ""
    return "%d.%d.%d.%d" % tuple(data[:4])


def _ip6(v: Any, elsize: int) -> str:
    data = _as_bytes(v, elsize)
    if len(data) < 16:
        return ""
    import ipaddress
    return str(ipaddress.IPv6Address(data[:16]))


def _uuid(v: Any, elsize: int) -> str:
    d = _as_bytes(v, elsize)
    if len(d) < 16:
        return ""
    h = d[:16].hex()
    return "%s-%s-%s-%s-%s" % (h[:8], h[8:12], h[12:16], h[16:20], h[20:])


def _udiv(a: int, b: int) -> int:
    b &= M64
    return (a & M64) // b if b else 0


def _umod(a: int, b: int) -> int:
    b &= M64
    return (a & M64) % b if b else 0


def _cdiv(a: int, b: int) -> int:
    if not b:
        return 0
    q = abs(a) // abs(b)
    return q if (a >= 0) == (b >= 0) else -q


def _cmod(a: int, b: int) -> int:
    if not b:
        return 0
    return a - b * _cdiv(a, b)


def _num(v: Any) -> int:
    return v if isinstance(v, int) else 0


def _text(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, int):
        return str(v)
    return ""


# Payload readers used by generated code in payload mode. Each copes with a short or
# hostile payload by returning an empty value: a wrong length must not stop a report.

def _cstr(p: Any, off: int, size: int) -> str:
    b = bytes(p[off:off + size] if size else p[off:])
    i = b.find(b"\0")
    return (b if i < 0 else b[:i]).decode("utf-8", "replace")


def _loc(p: Any, off: int, rel: bool) -> tuple[int, int]:
    if off + 4 > len(p):
        return 0, 0
    v = int.from_bytes(p[off:off + 4], "little")
    start = v & 0xFFFF
    if rel:
        start += off + 4
    return start, v >> 16


def _dstr(p: Any, off: int, rel: bool) -> str:
    start, n = _loc(p, off, rel)
    if not n:
        return ""
    return _cstr(p, start, n)


def _ints(b: bytes, elsize: int, signed: bool) -> list:
    if elsize not in (1, 2, 4, 8):
        return list(b)
    code = {1: "b", 2: "h", 4: "i", 8: "q"}[elsize]
    code = code if signed else code.upper()
    n = len(b) // elsize
    return list(struct.unpack_from("<%d%s" % (n, code), b)) if n else []


def _darr(p: Any, off: int, rel: bool, elsize: int, signed: bool) -> list:
    start, n = _loc(p, off, rel)
    return _ints(bytes(p[start:start + n]), elsize, signed)


def _sarr(p: Any, off: int, size: int, elsize: int, signed: bool) -> list:
    return _ints(bytes(p[off:off + size] if size else p[off:]), elsize, signed)


# The globals of all generated code: these helpers and a few safe builtins, nothing else.
_HELPERS = {
    "_s": _s, "_width": _width, "_ptr": _ptr, "_alt_hex": _alt_hex, "_flags": _flags, "_symbolic": _symbolic,
    "_hex": _hex, "_array": _array, "_bitmask": _bitmask, "_mac": _mac, "_ip4": _ip4,
    "_ip6": _ip6, "_uuid": _uuid, "_cdiv": _cdiv, "_cmod": _cmod, "_udiv": _udiv, "_umod": _umod, "_num": _num,
    "_text": _text, "_cstr": _cstr, "_dstr": _dstr, "_darr": _darr, "_sarr": _sarr,
    "__builtins__": {"len": len, "chr": chr, "min": min, "max": max, "int": int},
}
