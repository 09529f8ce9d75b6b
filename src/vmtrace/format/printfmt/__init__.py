"""Compile an event's ``print fmt`` into a Python function that renders it.

The kernel describes how to print each event as a C format string plus C argument
expressions (``REC->field``, ``__print_flags(...)``, casts, ternaries...). trace-cmd
interprets that text with libtraceevent every time it prints an event. We instead
translate it once per event type into Python source and ``exec`` it, so printing an
event costs one call and one ``%`` operation: that is what lets text output keep pace
with trace-cmd.

Where C and libtraceevent have a particular behaviour we copy the behaviour, not the
code: integers are masked to the width the conversion implies (``%d`` of a u64 prints
the low 32 bits, signed), ``%p`` of zero prints ``(nil)``, ``%s`` of a pointer-sized
field looks the address up in ``printk_formats``, ``__print_flags`` leaves unknown bits
as ``0x...``. A print fmt libtraceevent cannot handle (an unknown helper function) is
marked ``failed`` so the renderer can print ``[FAILED TO PARSE]`` like trace-cmd does.

Guest data is untrusted: the generated code never indexes outside what it was given,
and the compiler raises FormatError (one line) on text it cannot parse.

The compiler is a package by job; this module keeps the names its users import:

- :mod:`.cexpr`: the C argument expressions, parsed with libtraceevent's association;
- :mod:`.fmtstring`: the C format string, split into literals and conversions;
- :mod:`.fields`: what a field is to the compiler, and payload readers made from layouts;
- :mod:`.runtime`: the helpers generated code calls, and its whole namespace;
- :mod:`.codegen`: tree to Python, and :func:`compile_print_fmt` itself;
- :mod:`.limits`: the masks and the bounds against hostile input.

Names with a leading underscore are private to the package (its modules share them);
``_HELPERS`` is exported too because bulk renderers evaluate generated expressions in it.
"""
from __future__ import annotations

from vmtrace.format.printfmt.codegen import (PrintFmt, PrintkLookup, SymbolLookup,
                                             compile_print_fmt)
from vmtrace.format.printfmt.fields import FieldInfo, compile_reader, field_info, payload_reader
from vmtrace.format.printfmt.fmtstring import split_print_fmt
from vmtrace.format.printfmt.limits import (M32, M64, MAX_CONVERSIONS, MAX_DEPTH, MAX_HEX_BYTES,
                                            MAX_LITERAL_DIGITS, MAX_PRINT_FMT, MAX_WIDTH)
from vmtrace.format.printfmt.runtime import _HELPERS

__all__ = ["PrintFmt", "compile_print_fmt", "compile_reader", "payload_reader", "field_info",
           "FieldInfo", "split_print_fmt", "SymbolLookup", "PrintkLookup", "M32", "M64",
           "MAX_PRINT_FMT", "MAX_HEX_BYTES", "MAX_DEPTH", "MAX_WIDTH", "MAX_CONVERSIONS",
           "MAX_LITERAL_DIGITS", "_HELPERS"]
