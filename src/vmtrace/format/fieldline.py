"""The ``field:TYPE NAME; offset:N; size:N; signed:N;`` lines of tracefs format texts.

``header_page`` and every event format describe their fields this way, and both come
from the traced machine. The regexes that read them were quadratic or worse on padding
(2,500 spaces in header_page: 13 s; 60,000: hours), so a line is read here in one pass:
split once at ``;``, each part once at its first ``:``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

# Offsets and sizes are at most a page (16 MiB): 10 digits is already more than any, and
# int() of a 5000-digit text raises instead of parsing.
MAX_NUMBER_DIGITS = 10

__all__ = ["FieldLine", "parse_field_line", "MAX_NUMBER_DIGITS"]


class FieldLine(NamedTuple):
    decl: str                 # the C declaration as written ("unsigned long ip")
    offset: int
    size: int
    signed: Optional[int]     # None when the line has no signed: part


def _number(part: str, key: str) -> Optional[int]:
    key_, colon, value = part.strip().partition(":")
    if not colon or key_.rstrip() != key:
        return None
    value = value.strip()
    digits = value[1:] if value.startswith("-") else value
    if not digits or len(digits) > MAX_NUMBER_DIGITS or not digits.isdecimal():
        return None
    return int(value)


def parse_field_line(text: str) -> Optional[FieldLine]:
    """The field described by ``text`` (from its ``field:`` on), None if it is not one.

    ``text`` must start with ``field:``; what follows the size's ``;`` other than a
    ``signed:N;`` part is ignored, as the kernel may add parts.
    """
    if not text.startswith("field:"):
        return None
    parts = text[len("field:"):].split(";", 4)
    if len(parts) < 4:
        return None
    offset = _number(parts[1], "offset")
    size = _number(parts[2], "size")
    if offset is None or size is None:
        return None
    signed = _number(parts[3], "signed") if len(parts) > 4 else None
    return FieldLine(parts[0], offset, size, signed)
