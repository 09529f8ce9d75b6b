"""print fmt compilation: every format of this machine, and C/libtraceevent semantics.

Expected texts below were checked against trace-cmd's output on real traces (see
test_report_oracle.py, which covers the common events end to end); these tests pin
the rules one at a time so a regression names the rule it broke.
"""
from __future__ import annotations

import glob
import re
import struct

import pytest

from vmtrace.format.events import parse_format
from vmtrace.format.printfmt import (FieldInfo, compile_print_fmt, compile_reader,
                                     split_print_fmt)


def F(name, size=4, signed=False, offset=8, **kw):
    return FieldInfo(name=name, offset=offset, size=size, signed=signed, elsize=kw.pop("elsize", size), **kw)


def render(fmt, fields, **values):
    pf = compile_print_fmt(fmt, fields)
    assert pf.failed is None, pf.failed
    return pf.render(values)


@pytest.mark.tracefs
def test_every_format_on_this_machine_compiles():
    """~2300 real print fmts: none may raise; the few libtraceevent can't do either are marked."""
    paths = glob.glob("/sys/kernel/tracing/events/*/*/format")
    if not paths:
        pytest.skip("no tracefs event formats readable")
    failed = []
    for p in paths:
        with open(p, "rb") as f:
            text = f.read()
        fmt = parse_format(text, system=p.split("/")[-3])
        pf = compile_print_fmt(fmt.print_fmt, fmt.fields, where=p)
        if pf.failed:
            failed.append((p, pf.failed))
    # statement expressions, assignments, unknown helpers (kvmmmu, ras, bridge...)
    assert len(failed) <= max(20, len(paths) // 100), failed[:20]


def test_integer_conversions_mask_like_printf():
    pf = compile_print_fmt('"%d %u %x %lld %llx %hhd %hu", REC->a, REC->a, REC->a, REC->a, REC->a, REC->a, REC->a',
                           [F("a", 8, True)])
    assert pf.render({"a": -1}) == "-1 4294967295 ffffffff -1 ffffffffffffffff -1 65535"
    assert pf.render({"a": 0x1_0000_0005}) == "5 5 5 4294967301 100000005 5 5"


def test_width_precision_and_alt_form():
    pf = compile_print_fmt('"[%-5d|%5s|%08lx|%#x|%#x|%.*s]", REC->a, REC->s, REC->a, REC->a, REC->z, 3, REC->s',
                           [F("a", 4, True), F("z", 4), FieldInfo("s", 16, 16, is_array=True, is_string=True)])
    assert pf.render({"a": 42, "s": "abcdef", "z": 0}) == "[42   |abcdef|0000002a|0x2a|0|abc]"


def test_pointer_and_symbols():
    syms = {0xffffffff81000010: ("do_thing", 0xffffffff81000000)}
    pf = compile_print_fmt('"%p %p %pS %ps %pS", REC->p, REC->z, REC->f, REC->f, REC->u',
                           [F("p", 8), F("z", 8), F("f", 8), F("u", 8)], symbols=syms.get)
    out = pf.render({"p": 0xffff888000001000, "z": 0, "f": 0xffffffff81000010, "u": 0x1234})
    assert out == "0xffff888000001000 (nil) do_thing+0x10 do_thing 0x1234"


def test_string_of_pointer_field_uses_printk_formats():
    pf = compile_print_fmt('"%s|%s", REC->s, REC->t', [F("s", 8), F("t", 8)],
                           printk={0xffffffff82000000: "Start context switch"}.get)
    # not found: libtraceevent prints the address in hex without 0x
    assert pf.render({"s": 0xffffffff82000000, "t": 0xabc}) == "Start context switch|abc"


def test_print_flags_rules():
    fmt = '"%s", __print_flags(REC->f, "|", { 1, "A" }, { 2, "B" }, { 0x10, "C" })'
    assert render(fmt, [F("f")], f=3) == "A|B"
    assert render(fmt, [F("f")], f=0x23) == "A|B|0x20"   # leftover bits in hex
    assert render(fmt, [F("f")], f=0) == ""
    # an enum name libtraceevent cannot evaluate is -1: it is what it prints for 0
    named = '"%s", __print_flags(REC->f, "|", {I_DIRTY_SYNC, "I_DIRTY_SYNC"}, {I_NEW, "I_NEW"})'
    assert render(named, [F("f")], f=0) == "I_DIRTY_SYNC"
    assert render(named, [F("f")], f=2) == "0x2"


def test_print_symbolic_and_known_names():
    fmt = '"%s %s", __print_symbolic(REC->v, { 0, "zero" }, { 7, "seven" }), __print_symbolic(REC->w, { HRTIMER_RESTART, "restart" })'
    assert render(fmt, [F("v"), F("w", offset=12)], v=7, w=1) == "seven restart"
    assert render(fmt, [F("v"), F("w", offset=12)], v=5, w=0) == "0x5 0x0"


def test_operator_association_matches_libtraceevent():
    """libtraceevent turns `x & (A | B)` into `(x & A) | B`; trace-cmd prints that."""
    fmt = '"%s", __print_flags(REC->f & (0x1 | 0x2 | 0x4), "|", { 1, "a" }, { 2, "b" }, { 4, "c" })'
    assert render(fmt, [F("f")], f=0) == "b|c"
    # equal precedence binds to the right operand: a - b - c is a - (b - c)
    assert render('"%d", REC->a - REC->b - REC->c', [F("a"), F("b", offset=12), F("c", offset=16)],
                  a=10, b=4, c=3) == "9"
    # ordinary precedence still holds where libtraceevent gets it right
    assert render('"%d", REC->a + REC->b * 2', [F("a"), F("b", offset=12)], a=1, b=3) == "7"


def test_unsigned_arithmetic_and_unknown_atoms():
    # `jiffies` is not a field: libtraceevent reads it as 0 and computes unsigned
    fmt = '"age=%lu", (jiffies - REC->d) / 250'
    assert render(fmt, [F("d", 8)], d=4295001051) == "age=%d" % (((1 << 64) - 4295001051) // 250)


def test_ternary_casts_and_strings():
    fmt = '"%s %d %u", REC->f ? "yes" : "no", (int)REC->v, (unsigned char)REC->v'
    assert render(fmt, [F("f"), F("v", 8, offset=16)], f=0, v=0x1ff) == "no 511 255"


def test_hex_array_and_dynamic_helpers():
    fields = [FieldInfo("buf", 8, 4, is_array=True, is_dynamic=True, elsize=1),
              FieldInfo("arr", 12, 4, is_array=True, is_dynamic=True, elsize=4),
              FieldInfo("name", 16, 4, is_array=True, is_string=True, is_dynamic=True)]
    fmt = ('"%s|%s|%s|%s|%d", __print_hex(__get_dynamic_array(buf), 3), __print_hex_str(__get_dynamic_array(buf), 2), '
           '__print_array(__get_dynamic_array(arr), __get_dynamic_array_len(arr) / 4, 4), __get_str(name), '
           '__get_dynamic_array_len(buf)')
    out = render(fmt, fields, buf=[0xde, 0xad, 0xbe, 0xef], arr=[1, 0x20], name="sda")
    assert out == "de ad be|dead|{0x1,0x20}|sda|4"


def test_payload_mode_reads_fields_from_bytes():
    fields = [FieldInfo("pid", 4, 4, signed=True), FieldInfo("comm", 8, 16, is_array=True, is_string=True),
              FieldInfo("name", 24, 4, is_array=True, is_string=True, is_dynamic=True)]
    payload = struct.pack("<HBBi", 1, 0, 0, 7)[:4] + struct.pack("<i", -5) + b"bash\0".ljust(16, b"\0")
    payload += struct.pack("<I", (4 << 16) | 28) + b"sda\0"
    pf = compile_print_fmt('"%d %s %s", REC->pid, REC->comm, __get_str(name)', fields)
    assert pf.render_payload(payload) == "-5 bash sda"
    read = compile_reader(fields, ["comm", "pid"])
    assert read(payload) == ("bash", -5)


def test_hostile_text_is_marked_failed_not_raised():
    for text in ['"%d", REC->', '"%s", __print_flags(', '"%d" REC->a', '"%d", ((((((', 'no quote',
                 '"%d", ' + "(" * 5000 + "1" + ")" * 5000, '"%d", a = 1']:
        pf = compile_print_fmt(text, [F("a")])
        assert pf.failed, text


def test_split_print_fmt_concatenates_and_unescapes():
    fmt, args = split_print_fmt('"a\\tb" "c%%d\\n", REC->x')
    assert fmt == "a\tbc%%d\n" and args.strip() == "REC->x"
