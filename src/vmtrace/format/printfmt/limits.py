"""Masks and the bounds a print fmt or payload may not exceed.

Kept in one place because the bounds are the security contract of the compiler (see
docs/security.md): each is enforced where the parser, the format-string reader or
a runtime helper meets the quantity, but read here they can be reviewed together.
"""
from __future__ import annotations

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1

# Limits that keep a hostile format or payload from costing unbounded time or memory.
MAX_PRINT_FMT = 256 * 1024
MAX_HEX_BYTES = 64 * 1024
# Nesting of the argument expressions (calls, operators, unary operators, casts,
# parentheses together). Real print fmts nest under 20; the generated Python adds about
# two levels per level here and CPython's parser stops at 200 parentheses.
MAX_DEPTH = 64
# Field width and precision, written or passed with '*': the kernel's formats pad to 16
# at most; trace-cmd would pad to any width, so 10 events of %100000000u made 2 GB.
MAX_WIDTH = 256
# Conversions in one print fmt (the kernel's longest has ~25): with MAX_WIDTH, what one
# event can print is bounded by the print fmt and the payload, not by a number in them.
MAX_CONVERSIONS = 64
# An integer literal is at most 64 bits, so at most 22 octal digits; int() refuses
# 4300+ decimal digits with a ValueError instead.
MAX_LITERAL_DIGITS = 24
