"""The C format string of a print fmt: literal text and ``%`` conversions.

Split the way libtraceevent splits it (an unknown conversion prints as ``>c<``, ``%p``
takes libtraceevent's extension letters), because trace-cmd's text is the reference;
widths and conversion counts are bounded here, where a hostile format would first
cost memory.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from vmtrace.errors import FormatError
from vmtrace.format.printfmt.cexpr import _unescape
from vmtrace.format.printfmt.limits import MAX_CONVERSIONS, MAX_WIDTH

_SPEC = re.compile(r"%([-+ #0]*)(\*|\d+)?(?:\.(\*|\d+))?(hh|h|ll|l|L|z|Z|j|t)?([diouxXcspn%])")


@dataclass
class _Conv:
    flags: str
    width: Optional[str]
    prec: Optional[str]
    length: str
    conv: str
    ext: str = ""       # pointer extension: S s F f M m I4 U h ...


def _parse_format(fmt: str) -> list:
    """Split a C format into literal strings and _Conv items, libtraceevent style."""
    out: list = []
    pos = 0
    lit = []
    n = len(fmt)
    while pos < n:
        c = fmt[pos]
        if c != "%":
            lit.append(c)
            pos += 1
            continue
        if fmt.startswith("%%", pos):
            lit.append("%")
            pos += 2
            continue
        m = _SPEC.match(fmt, pos)
        if not m:
            # libtraceevent prints an unknown conversion as >c< and moves on
            j = pos + 1
            while j < n and fmt[j] in "-+ #0123456789.*hlLzZ":
                j += 1
            lit.append(">%s<" % (fmt[j] if j < n else ""))
            pos = j + 1
            continue
        if m.group(5) == "%":
            # "%" with flags or a width between ("% %"): C prints a '%' and takes no
            # argument; passing the spec on made Python's % operator raise
            lit.append("%")
            pos = m.end()
            continue
        if lit:
            out.append("".join(lit))
            lit = []
        conv = _Conv(m.group(1), m.group(2), m.group(3), m.group(4) or "", m.group(5))
        for num in (conv.width, conv.prec):
            if num not in (None, "*") and (len(num) > 4 or int(num) > MAX_WIDTH):
                raise FormatError(f"print fmt: width or precision {num[:12]} is more than {MAX_WIDTH}")
        if sum(isinstance(p, _Conv) for p in out) >= MAX_CONVERSIONS:
            raise FormatError(f"print fmt: more than {MAX_CONVERSIONS} conversions")
        pos = m.end()
        if conv.conv == "p":
            conv.ext = _pointer_ext(fmt, pos)
            pos += len(conv.ext)
        out.append(conv)
    if lit:
        out.append("".join(lit))
    return out


def _pointer_ext(fmt: str, pos: int) -> str:
    """How many letters after %p belong to the pointer extension (libtraceevent's rules)."""
    s = fmt[pos:pos + 6]
    if not s:
        return ""
    c = s[0]
    if c in "FSfs":
        return c
    if c in "Mm":
        return s[:2] if s[1:2] in ("R", "F") else c
    if c in "Ii":
        if s[1:2] == "4":
            return s[:3] if s[2:3] in ("h", "n", "l", "b") else s[:2]
        if s[1:2] == "6":
            return s[:3] if s[2:3] == "c" else s[:2]
        if s[1:2] == "S":
            j = 2
            while j < len(s) and s[j] in "pfs":
                j += 1
            if j < len(s) and s[j] in "hnlb":
                j += 1
            if j < len(s) and s[j] == "c":
                j += 1
            return s[:j]
        return s[:2] if len(s) > 1 else c
    if c == "U":
        return s[:2] if s[1:2] in ("L", "l", "B", "b") else c
    if c == "h":
        return s[:2] if s[1:2] in ("C", "D", "N") else c
    return ""


def split_print_fmt(text: str) -> tuple[str, str]:
    """Split ``"format", args`` into the unescaped format and the argument text."""
    t = text.strip()
    if t.startswith("print fmt:"):
        t = t[len("print fmt:"):].strip()
    if not t.startswith('"'):
        raise FormatError("print fmt: does not start with a string")
    parts = []
    pos = 0
    while pos < len(t) and t[pos] == '"':
        m = re.compile(r'"((?:[^"\\]|\\.)*)"').match(t, pos)
        if not m:
            raise FormatError("print fmt: unterminated string")
        parts.append(_unescape(m.group(1)))
        pos = m.end()
        while pos < len(t) and t[pos].isspace():
            pos += 1
    rest = t[pos:].strip()
    if rest.startswith(","):
        rest = rest[1:]
    elif rest:
        raise FormatError(f"print fmt: expected ',' after the format, found {rest[:20]!r}")
    return "".join(parts), rest
