"""The Python API against the oracle: a real trace of many subsystems, decoded by us and
printed by ``trace-cmd report``, must agree event for event (time, CPU, name, dropped
events) and field for field (values from ``trace-cmd report -R``)."""
from __future__ import annotations

import os
import re
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest

import realtrace
import vmtrace
from vmtrace.errors import FormatError

from realtrace import SYSTEMS

_EV = re.compile(r"\[(\d+)\]\s+(\d+)\.(\d+):\s+([^:\s]+):\s?(.*)$")
_LOST = re.compile(r"CPU:(\d+) \[(?:(\d+) )?EVENTS DROPPED\]")
_SYM = re.compile(r"^[A-Za-z_][\w.]*(\+0x[0-9a-f]+)?$")

pytestmark = [pytest.mark.tracefs, pytest.mark.oracle]


@pytest.fixture(scope="module")
def rich_trace(tmp_path_factory) -> Path:
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    out = tmp_path_factory.mktemp("rich") / "trace.dat"
    # A small buffer on purpose: the busy CPU overflows, so dropped events are tested too.
    return realtrace.record_tracedat(out, events=SYSTEMS, buffer_kb=512,
                                     instance=f"vmtrace-decoder-api-{os.getpid()}")


def _oracle(path: Path, *args: str):
    out = realtrace.trace_cmd_report(path, "-t", *args)
    items = []
    for line in out.splitlines():
        m = _LOST.search(line)
        if m:
            items.append((int(m.group(1)), "LOST", int(m.group(2)) if m.group(2) else -1, ""))
            continue
        m = _EV.search(line)
        if m:
            ts = int(m.group(2)) * 10**9 + int(m.group(3).ljust(9, "0"))
            items.append((int(m.group(1)), ts, m.group(4), m.group(5)))
    return items


def _ours(tr):
    return [(e.cpu, "LOST", e.count) if e.kind == "lost" else (e.cpu, e.ts, e.name)
            for e in tr.events()]


def test_event_stream_matches_trace_cmd_report(rich_trace):
    with vmtrace.open(rich_trace) as tr:
        ours = _ours(tr)
        stats = tr.stats()
    theirs = [t[:3] for t in _oracle(rich_trace)]
    assert len(ours) > 1000
    assert ours == theirs
    assert stats["events"] == sum(1 for o in ours if o[1] != "LOST")
    systems = {name.split(":")[0] for name in stats["per_event"]}
    assert {"sched", "kmem", "raw_syscalls", "syscalls", "timer"} <= systems


def test_v6_file_decodes_the_same(rich_trace, tmp_path):
    v6 = realtrace.convert_v6(rich_trace, tmp_path / "v6.dat")
    with vmtrace.open(rich_trace) as a, vmtrace.open(v6) as b:
        assert _ours(a) == _ours(b)


def _same(ours, text, field, meta):
    """Compare one decoded value with trace-cmd's -R text; None when not comparable."""
    if isinstance(ours, str):
        return ours == text
    if isinstance(ours, list):
        if not text.startswith("ARRAY["):
            return None
        got = bytes(int(b, 16) for b in text[6:-1].split(", ") if b)
        mask = (1 << (8 * field.elem_size)) - 1
        return got == b"".join((v & mask).to_bytes(field.elem_size, "little") for v in ours)
    if text == "(nil)":
        return ours == 0
    mask = (1 << (8 * field.size)) - 1
    for base in (0, 10, 16):
        try:
            n = int(text, base)
        except ValueError:
            continue
        if n == ours or (n & mask) == (ours & mask):
            return True
    if _SYM.match(text) and meta.kallsyms.lookup(ours):
        return meta.kallsyms.format(ours, with_size=False) == text
    if meta.printk_string(ours) is not None:
        return meta.printk_string(ours) == text
    return None


def test_field_values_match_trace_cmd_raw_output(rich_trace):
    lines = [t for t in _oracle(rich_trace, "-R") if t[1] != "LOST"]
    compared = skipped = 0
    bad = []
    with vmtrace.open(rich_trace) as tr:
        events = [e for e in tr.events() if e.kind == "event"]
        assert len(events) == len(lines)
        for e, (cpu, ts, name, text) in zip(events, lines):
            assert (e.cpu, e.ts, e.name) == (cpu, ts, name)
            fields = e.fmt.event_fields
            starts = []
            pos = 0
            for f in fields:  # -R prints name=value in format order
                k = text.find(f.name + "=", pos)
                while k > 0 and text[k - 1] != " ":
                    k = text.find(f.name + "=", k + 1)
                starts.append(k if k >= 0 else None)
                if k >= 0:
                    pos = k + len(f.name) + 1
            for i, f in enumerate(fields):
                if starts[i] is None:
                    skipped += 1
                    continue
                later = [s for s in starts[i + 1:] if s is not None]
                value = text[starts[i] + len(f.name) + 1:(later[0] - 1) if later else None]
                verdict = _same(e.fields[f.name], value, f, tr.metadata)
                if verdict is None:
                    skipped += 1
                elif verdict:
                    compared += 1
                elif len(bad) < 5:
                    bad.append((e.event, f.name, e.fields[f.name], value))
    assert not bad
    assert compared > 10 * max(skipped, 1) and compared > 5000


def test_filters_tables_and_stats_agree(rich_trace):
    with vmtrace.open(rich_trace) as tr:
        table = tr.table()
        stats = tr.stats()
        assert table.num_rows == stats["events"]
        ts = table.column("ts").to_numpy()
        assert (np.diff(ts.astype(np.int64)) >= 0).all()
        names, counts = np.unique(table.column("event").to_pylist(), return_counts=True)
        assert dict(zip(names.tolist(), counts.tolist())) == stats["per_event"]
        sw = tr.event_table("sched:sched_switch")
        assert sw.num_rows == stats["per_event"].get("sched:sched_switch", 0) > 0
        assert set(sw.column_names) >= {"ts", "cpu", "pid", "comm", "prev_comm", "next_pid"}
        first = next(e for e in tr.events(events=["sched:sched_switch"]) if e.kind == "event")
        row = sw.slice(0, 1).to_pylist()[0]
        assert (row["ts"], row["prev_comm"], row["next_pid"]) == \
            (first.ts, first.fields["prev_comm"], first.fields["next_pid"])
        cpu0 = [e for e in tr.events(cpus=[0], events=["sched"]) if e.kind == "event"]
        assert cpu0 and all(e.cpu == 0 and e.system == "sched" for e in cpu0)
        mid = int(ts[len(ts) // 2])
        window = [e for e in tr.events(start=mid, end=mid + 1_000_000) if e.kind == "event"]
        assert window and all(mid <= e.ts <= mid + 1_000_000 for e in window)


def test_corrupt_page_strict_and_keep_going(rich_trace, tmp_path):
    from vmtrace.format.rawdir import write_rawdir
    from vmtrace.sources import open_source, source_metadata
    with open_source(rich_trace) as src:
        md = source_metadata(src)
        buf = next(b for b in src.buffers if any(c.size for c in b.cpus))
        cpus = {c.cpu: b"".join(bytes(p) for p in c.pages()) for c in buf.cpus}
    cpu = max(cpus, key=lambda c: len(cpus[c]))
    data = bytearray(cpus[cpu])
    assert len(data) >= 3 * 4096
    struct.pack_into("<II", data, 4096 + 16, 0, 1 << 20)  # page 1: a record longer than a page
    cpus[cpu] = bytes(data)
    md["meta.json"] = (b'{"layout": "vmtrace-raw", "layout_version": 1, "page_size": 4096, '
                       b'"long_size": 8, "endian": "little", "clock": "local"}')
    raw = write_rawdir(tmp_path / "raw", md, cpus)
    with vmtrace.open(raw) as tr:
        with pytest.raises(FormatError) as ei:
            tr.stats()
        assert f"cpu{cpu}" in str(ei.value) and "\n" not in str(ei.value)
    with vmtrace.open(raw, keep_going=True) as tr:
        st = tr.stats()
        assert st["cpus"][cpu]["problems"] == 1 and st["events"] > 1000
