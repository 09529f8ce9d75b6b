"""Event format parsing (every format file of this machine) and payload decoding, one
at a time and columnar, which must agree with each other on real recorded events."""
from __future__ import annotations

import glob
import os
import struct

import numpy as np
import pytest

from vmtrace.errors import FormatError
from vmtrace.format import columns, events as ev
from vmtrace.format.events import EventCatalog, parse_format
from fmt_texts import sched_switch

SCHED_SWITCH = sched_switch()

DYN = """name: dyn
ID: 9
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;
\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;
\tfield:__rel_loc char[] rel;\toffset:12;\tsize:4;\tsigned:0;
\tfield:__data_loc unsigned int[] ids;\toffset:16;\tsize:4;\tsigned:0;
\tfield:u8 mac[6];\toffset:20;\tsize:6;\tsigned:0;
\tfield:const char * ptr;\toffset:32;\tsize:8;\tsigned:0;
\tfield:char tail[];\toffset:40;\tsize:0;\tsigned:0;
print fmt: "%s", __get_str(name)
"""


def _sched_payload(prev: bytes, pid: int, state: int, nxt: bytes) -> bytes:
    return struct.pack("<HBBi16siiq16sii", 372, 1, 2, pid, prev, pid, 120, state, nxt, 7, 100)


def test_sched_switch_layout_and_decode():
    fmt = parse_format(SCHED_SWITCH, system="sched")
    assert (fmt.id, fmt.full_name, fmt.fixed_size) == (372, "sched:sched_switch", 64)
    assert fmt.print_fmt.startswith('"prev_comm=%s')
    kinds = {f.name: f.kind for f in fmt.fields}
    assert kinds["prev_comm"] == ev.STRING and kinds["prev_state"] == ev.SCALAR
    assert fmt.field("prev_state").is_long and fmt.field("prev_pid").signed
    p = _sched_payload(b"bash\0junk", 42, -1, b"swapper/1")
    assert fmt.decode(p) == {"prev_comm": "bash", "prev_pid": 42, "prev_prio": 120,
                             "prev_state": -1, "next_comm": "swapper/1", "next_pid": 7,
                             "next_prio": 100}
    assert fmt.decode(p, common=True)["common_pid"] == 42
    with pytest.raises(FormatError, match="shorter"):
        fmt.decode(p[:30])


def test_dynamic_rel_loc_arrays_pointers_and_flexible_tail():
    fmt = parse_format(DYN, system="t")
    f = {x.name: x for x in fmt.fields}
    assert f["name"].kind == ev.DYN_STRING and f["rel"].rel and f["ids"].kind == ev.DYN_ARRAY
    assert f["ids"].elem_size == 4 and f["mac"].kind == ev.ARRAY and f["mac"].count == 6
    assert f["ptr"].is_pointer and f["tail"].kind == ev.FLEX_STRING
    body = bytearray(64)
    struct.pack_into("<HBBi", body, 0, 9, 0, 0, 5)
    name_at, rel_from = 48, 16                      # rel_loc counts from the field's end
    body += b"hello\0" + b"r\0" + struct.pack("<II", 3, 4000000000)
    struct.pack_into("<I", body, 8, 64 | (6 << 16))
    struct.pack_into("<I", body, 12, (70 - rel_from) | (2 << 16))
    struct.pack_into("<I", body, 16, 72 | (8 << 16))
    body[20:26] = bytes([1, 2, 3, 4, 5, 6])
    struct.pack_into("<Q", body, 32, 0xFFFFFFFF81000000)
    body[40:44] = b"end\0"
    out = fmt.decode(bytes(body))
    assert out["name"] == "hello" and out["rel"] == "r" and out["ids"] == [3, 4000000000]
    assert out["mac"] == [1, 2, 3, 4, 5, 6] and out["ptr"] == 0xFFFFFFFF81000000
    assert out["tail"] == "end"
    struct.pack_into("<I", body, 8, 64 | (200 << 16))
    with pytest.raises(FormatError, match="past the payload end"):
        fmt.decode(bytes(body))
    del name_at


@pytest.mark.parametrize("text, what", [
    ("ID: 1\nformat:\n", "event name"),
    ("name: x\nformat:\n", "no ID"),
    ("name: x\nID: 99999999\n", "bad event ID"),
    ("name: x\nID: 1\n\tfield:int a;\toffset:zz;\n", "cannot parse field"),
    ("name: x\nID: 1\n\tfield:int a;\toffset:1;\tsize:999999999;\tsigned:0;\n", "out of range"),
    ("name: x\nID: 1\n\tfield:__data_loc char[] a;\toffset:1;\tsize:8;\tsigned:0;\n", "dynamic"),
])
def test_bad_format_texts(text, what):
    with pytest.raises(FormatError, match=what):
        parse_format(text, source="events/x/x/format")


@pytest.mark.tracefs
def test_every_format_file_of_this_machine_parses():
    paths = glob.glob("/sys/kernel/tracing/events/*/*/format")
    assert len(paths) > 500
    kinds = set()
    for p in paths:
        with open(p, "rb") as f:
            fmt = parse_format(f.read(), system=p.split("/")[-3], source=p)
        assert fmt.fields and fmt.name == p.split("/")[-2]
        kinds.update(x.kind for x in fmt.fields)
        for x in fmt.fields:
            if x.kind in (ev.SCALAR, ev.STRING, ev.ARRAY):
                assert x.offset + x.size <= ev.MAX_PAYLOAD
    assert {ev.SCALAR, ev.STRING, ev.ARRAY, ev.DYN_STRING, ev.DYN_ARRAY}.issubset(kinds)


def test_catalog_lookup_and_match():
    cat = EventCatalog.from_texts([], [("sched", SCHED_SWITCH.encode()), ("t", DYN.encode()),
                                       ("bad", b"garbage")])
    assert len(cat) == 2 and cat.get(372).name == "sched_switch" and cat.get(1) is None
    assert cat.by_name("sched:sched_switch").id == 372 and cat.by_name("dyn").id == 9
    assert cat.match(["sched"]) == [372] and cat.match(["*:dyn", "sched:sched_s*"]) == [9, 372]


def _by_type(tr):
    """Every batch of every CPU, split by event type: (batch, format, row indices)."""
    for cpu in tr.cpus():
        for batch in tr.batches(cpu):
            for t in np.unique(batch.type_id).tolist():
                yield batch, tr.catalog.get(t), np.nonzero(batch.type_id == t)[0]


@pytest.mark.tracefs
@pytest.mark.oracle
def test_columnar_equals_scalar_decode_on_a_real_trace(real_trace):
    """Every field of every event: the numpy path and the per-event path agree."""
    import vmtrace
    with vmtrace.open(real_trace) as tr:
        checked = 0
        for batch, fmt, sel in _by_type(tr):
            cols = fmt.columns(batch, sel)
            for j, i in enumerate(sel.tolist()):
                one = fmt.decode(batch.payload(i))
                for name, value in one.items():
                    got = cols[name][j]
                    got = got.tolist() if isinstance(got, np.ndarray) else got
                    got = int(got) if isinstance(got, np.integer) else got
                    assert got == value, (fmt.full_name, name)
                checked += 1
        assert checked > 100


def test_bytes_columns_equal_str_columns_on_a_real_trace(real_trace):
    """strings="bytes": the same values as text, fixed-width and not decoded."""
    import vmtrace
    with vmtrace.open(real_trace) as tr:
        strings = 0
        for batch, fmt, sel in _by_type(tr):
            a = fmt.columns(batch, sel, common=True)
            b = fmt.columns(batch, sel, common=True, strings="bytes")
            assert a.keys() == b.keys()
            for name in a:
                if b[name].dtype.kind == "S":
                    assert columns.text_column(b[name]).tolist() == a[name].tolist()
                    strings += len(sel)
                elif a[name].dtype != object:
                    assert np.array_equal(a[name], b[name])
        assert strings > 100


@pytest.mark.parametrize("width", [1, 3, 8, 16, 20, 33])
def test_cut_at_nul_matches_text_rules(width):
    rng = np.random.default_rng(width)
    block = (rng.integers(0, 3, (300, width)) * 0x61).astype(np.uint8)
    block[:5] = 0x62                                   # no NUL at all
    cut = columns.cut_at_nul(block)
    assert cut.dtype == np.dtype(f"S{width}")
    assert [columns._text(bytes(r)) for r in block] == [c.decode("utf-8", "replace") for c in cut.tolist()]
    lengths = rng.integers(0, width + 1, 300)
    cut = columns.cut_at_nul(block, lengths)
    assert [columns._text(bytes(r[:n])) for r, n in zip(block, lengths)] == \
        [c.decode("utf-8", "replace") for c in cut.tolist()]


def test_dyn_strings_as_bytes_and_bad_locations():
    fmt = parse_format("name: e\nID: 7\nformat:\n"
                       "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
                       "\tfield:__data_loc char[] name;\toffset:8;\tsize:4;\tsigned:0;\n")
    def payload(text: bytes, loc=None) -> bytes:
        body = text + b"\0"
        loc = loc if loc is not None else (len(body) << 16) | 12
        return struct.pack("<H6xI", 7, loc) + body
    pays = [payload(b"kmalloc-64"), payload(b""), payload(b"a\0b"), payload(b"x" * 90)]
    data = b"".join(pays)
    offs = np.cumsum([0] + [len(p) for p in pays[:-1]]).astype(np.int64)
    lens = np.array([len(p) for p in pays], np.int32)
    col = fmt.columns_at(data, offs, lens, strings="bytes")["name"]
    assert col.tolist() == [b"kmalloc-64", b"", b"a", b"x" * 90]
    bad = payload(b"abc", loc=(50 << 16) | 12)
    with pytest.raises(FormatError):
        fmt.columns_at(bad, np.zeros(1, np.int64), np.array([len(bad)], np.int32),
                       strings="bytes")
    col = fmt.columns_at(bad, np.zeros(1, np.int64), np.array([len(bad)], np.int32),
                         strings="bytes", keep_going=True)["name"]
    assert col.tolist() == [b""]
