"""The bulk text renderer (vmtrace.format.fastrender) against the per-event one and trace-cmd.

Synthetic traces cover what real ones rarely show: clocks that step back, equal
timestamps across CPUs, drop markers inside and at the end of a chunk, payloads too
short for their fields, non-ASCII names in padded conversions, events without a format,
comm learning from sched_switch. Real traces (recorded here) must come out byte for byte
like `trace-cmd report` from both paths.
"""
from __future__ import annotations

import random
import struct
from pathlib import Path

import numpy as np
import pytest

import realtrace
from vmtrace import api
from vmtrace.text import trace_blocks as text_blocks, trace_lines as text_lines
from vmtrace.format.fastargs import _conversions
from vmtrace.format.fastrender import FastKallsyms
from vmtrace.format.metadata import KallSyms
from vmtrace.format.ringbuffer import EventBatch, LostMark

from faketrace import FakeTrace

NAMES = ["sh", "worker", "kswapd0", "céline", "x" * 8, ""]


def _switch(pid, prev, prev_pid, nxt, next_pid):
    return (struct.pack("<HBBi", 372, 0, 0, pid) + prev.encode()[:16].ljust(16, b"\0")
            + struct.pack("<iiq", prev_pid, 120, 1) + nxt.encode()[:16].ljust(16, b"\0")
            + struct.pack("<ii", next_pid, 120))


def _ev(pid, val, name, msg, flags):
    m = msg.encode() + b"\0"
    return (struct.pack("<HBBii", 500, 0, 0, pid, val) + name.encode()[:8].ljust(8, b"\0")
            + struct.pack("<I", (len(m) << 16) | 32) + struct.pack("<Q", flags) + m)


def _random_batches(seed: int) -> dict:
    rnd = random.Random(seed)
    out = {}
    for cpu in range(3):
        ts = 1_000_000_000
        batches = []
        for _ in range(rnd.randint(1, 4)):
            payloads, times, lost = [], [], []
            for i in range(rnd.randint(0, 300)):
                r = rnd.random()
                ts += rnd.choice([0, 0, 1, 500, 1000, 123456])
                if r < 0.02:
                    ts -= rnd.randint(0, 5_000_000)           # the clock steps back
                pid = rnd.choice([0, 7, 100, 101, 102, 103, 104, 2 ** 31 - 1])
                if r < 0.25:
                    p = _switch(pid, rnd.choice(NAMES), rnd.choice([100, 101, 102, 103]),
                                rnd.choice(NAMES), rnd.choice([0, 101, 102, 104]))
                elif r < 0.9:
                    p = _ev(pid, rnd.randint(-2 ** 31, 2 ** 31 - 1), rnd.choice(NAMES),
                            rnd.choice(["", "hello", "wörld", "a" * 40]), rnd.randint(0, 7))
                else:
                    p = struct.pack("<HBBi", 777, 0, 0, pid) + b"\0" * 4   # no format
                if rnd.random() < 0.03:
                    p = p[:rnd.randint(2, len(p))]                 # short payload
                if rnd.random() < 0.03:
                    lost.append(LostMark(i, rnd.choice([-1, 5, 1000]), ts))
                payloads.append(p + b"\0" * (-len(p) % 4))
                times.append(ts)
            if rnd.random() < 0.3:
                lost.append(LostMark(len(payloads), 3, ts + 10))  # after the last event
            offs = np.cumsum([0] + [len(p) for p in payloads[:-1]]).astype(np.int64) if payloads \
                else np.zeros(0, np.int64)
            data = b"".join(payloads)
            tid = np.array([int.from_bytes(p[:2], "little") for p in payloads], np.uint16)
            batches.append(EventBatch(cpu=cpu, ts=np.array(times, np.uint64), offset=offs,
                                      length=np.array([len(p) for p in payloads], np.int32),
                                      type_id=tid, data=data, lost=lost))
        out[cpu] = batches
    return out


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("name", ["inst", ""])
def test_fast_equals_per_event_on_synthetic_traces(seed, name):
    tr = FakeTrace(_random_batches(seed), name)
    slow = b"".join(text_blocks(tr, fast=False))
    fast = b"".join(text_blocks(FakeTrace(_random_batches(seed), name)))
    assert slow.count(b"\n") > 10
    if fast != slow:
        a, b = slow.decode().splitlines(), fast.decode().splitlines()
        diff = [(i, x, y) for i, (x, y) in enumerate(zip(a, b)) if x != y][:5]
        pytest.fail(f"{len(a)} vs {len(b)} lines; first differences: {diff}")


def test_fast_cpu_filter_equals_per_event():
    slow = b"".join(text_blocks(FakeTrace(_random_batches(3)), cpus=[0, 2], fast=False))
    fast = b"".join(text_blocks(FakeTrace(_random_batches(3)), cpus=[0, 2]))
    assert fast == slow


def test_small_windows_keep_order_and_state(monkeypatch):
    """Many render steps (tiny sub-chunks): comm learning and drop prefixes carry over."""
    from vmtrace.format import fastrender
    monkeypatch.setattr(fastrender, "SUB_CHUNK", 7)
    for seed in (1, 5):
        slow = b"".join(text_blocks(FakeTrace(_random_batches(seed)), fast=False))
        assert b"".join(text_blocks(FakeTrace(_random_batches(seed)))) == slow


def test_conversions():
    assert _conversions("a=%d b=%s c=%-6s d=%.3s %% e=%*d f=%#x") == \
        [None, "s", "s!", "s!", None, None, None]
    assert _conversions("%(x)s") is None
    assert _conversions("%f") is None


def test_fast_kallsyms_same_lookups():
    text = (b"ffffffff81000000 T _stext\nffffffff81000000 T startup_64\n"
            b"ffffffff81000100 t helper\tmodule_x [mod]\nffffffff81000200 T last\n"
            b"0000000000000000 A hidden\n\nffffffffa0000000 t zzz\t[kvm]\n")
    fast, slow = FastKallsyms(text, None), KallSyms(text)
    for a in [0, 0xffffffff80ffffff, 0xffffffff81000000, 0xffffffff81000050,
              0xffffffff81000100, 0xffffffff810001ff, 0xffffffff81000200, 0xffffffff8100ffff,
              0xffffffffa0000000, 0xffffffffa0001234, (1 << 64) - 1]:
        assert fast.lookup(a) == slow.lookup(a), hex(a)
    # anything irregular goes to the line parser
    odd = b"ffffffff81000000  T two_spaces\nffffffff81000100 T fine\n"
    assert FastKallsyms(odd, KallSyms(odd)).lookup(0xffffffff81000010) == \
        KallSyms(odd).lookup(0xffffffff81000010)


# ------------------------------------------------------------------ real traces

SYSTEMS = ["sched", "timer", "kmem", "irq", "workqueue", "raw_syscalls", "syscalls", "block",
           "writeback", "filemap", "rcu", "signal", "task"]


@pytest.fixture(scope="module")
def traces(tmp_path_factory):
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    d = tmp_path_factory.mktemp("fast")
    rich = realtrace.record_tracedat(d / "rich.dat", events=SYSTEMS, buffer_kb=2048)
    v6 = realtrace.convert_v6(rich, d / "rich-v6.dat")
    heavy = "for i in $(seq 200); do cat /proc/self/status > /dev/null; done"
    dropped = realtrace.record_tracedat(d / "dropped.dat", events=["sched", "kmem", "raw_syscalls"],
                                        workload=heavy, buffer_kb=64)
    return {"v7": rich, "v6": v6, "dropped": dropped}


def _both(path: Path, **sel) -> tuple:
    with api.open(path) as t:
        fast = b"".join(text_blocks(t, **sel))
    with api.open(path) as t:
        slow = ("\n".join(text_lines(t, **sel)) + "\n").encode()
    return fast, slow


@pytest.mark.tracefs
@pytest.mark.oracle
@pytest.mark.parametrize("which", ["v7", "v6", "dropped"])
def test_fast_and_per_event_identical_to_trace_cmd(traces, which):
    path = traces[which]
    fast, slow = _both(path)
    theirs = realtrace.trace_cmd_report(path).encode()
    assert fast.count(b"\n") > 1000
    assert fast == slow
    if fast != theirs:
        a, b = theirs.decode().splitlines(), fast.decode().splitlines()
        diff = [(x, y) for x, y in zip(a, b) if x != y]
        # the per-event path's own target (tests/report/test_report_oracle.py): >= 99.9 % identical
        assert len(a) == len(b) and len(diff) <= 0.001 * len(a), diff[:5]
    if which == "dropped":
        assert b"EVENTS DROPPED]" in fast
    from vmtrace.format.fastrender import FastReport
    with api.open(path) as t:
        fr = FastReport(t, [b for b in t.source.buffers if any(c.size for c in b.cpus)][0])
        for _ in fr.blocks():
            pass
    assert fr.counts["per_event"] <= 0.01 * fr.counts["bulk"], fr.counts


@pytest.mark.tracefs
@pytest.mark.oracle
def test_fast_cpu_filter_on_real_trace(traces):
    fast, slow = _both(traces["v7"], cpus=[0])
    assert fast == slow and fast.count(b"\n") > 10


@pytest.mark.tracefs
@pytest.mark.oracle
def test_fast_on_raw_directory_with_repeating_clock(traces, tmp_path):
    """Pages repeated (bench decode's big raw directory): each CPU's clock jumps back at
    every copy; the merge must still order items like trace-cmd's pick-the-smallest."""
    from vmtrace.bench.decode import make_big_rawdir
    raw = tmp_path / "raw"
    make_big_rawdir(str(traces["dropped"]), str(raw), 3 * Path(traces["dropped"]).stat().st_size)
    fast, slow = _both(raw)
    assert fast == slow and fast.count(b"\n") > 1000


def _tied_batches() -> dict:
    """Three CPUs whose events all carry the same few timestamps, in several batches."""
    out = {}
    for cpu in range(3):
        batches = []
        for b in range(3):
            payloads = [_ev(100 + cpu, cpu * 1000 + b * 10 + i, "c%d" % cpu, "b%d" % b, 0)
                        for i in range(5 + cpu)]
            payloads = [p + b"\0" * (-len(p) % 4) for p in payloads]
            offs = np.cumsum([0] + [len(p) for p in payloads[:-1]]).astype(np.int64)
            ts = np.full(len(payloads), 5_000 + (b // 2) * 1000, np.uint64)
            batches.append(EventBatch(cpu=cpu, ts=ts, offset=offs,
                                      length=np.array([len(p) for p in payloads], np.int32),
                                      type_id=np.full(len(payloads), 500, np.uint16),
                                      data=b"".join(payloads)))
        out[cpu] = batches
    return out


def test_equal_timestamps_across_batches_go_to_the_lower_cpu():
    slow = b"".join(text_blocks(FakeTrace(_tied_batches()), fast=False))
    fast = b"".join(text_blocks(FakeTrace(_tied_batches())))
    assert fast == slow
    cpus = [line.split(b"[")[1][:3] for line in slow.splitlines()[1:]]
    assert cpus[:2 * 5] == [b"000"] * 10     # CPU 0's first two batches share the time


def test_bulk_path_is_taken():
    """Equality alone would not notice the bulk path quietly falling back everywhere."""
    from vmtrace.format.fastrender import FastReport
    tr = FakeTrace(_random_batches(2))
    fr = FastReport(tr, tr.source.buffers[0])
    lines = sum(b.count(b"\n") for b in fr.blocks())
    # per event: short payloads (~3 %), rows of groups hit by them, and nothing else
    assert fr.counts["bulk"] >= 0.8 * lines, fr.counts


def test_seconds_column_changing_width():
    """Seconds from 99999 to 100000 in one step: the time column cannot be one width."""
    out = {}
    for cpu in range(2):
        payloads = [_ev(100, i, "n", "m", 0) for i in range(40)]
        payloads = [p + b"\0" * (-len(p) % 4) for p in payloads]
        offs = np.cumsum([0] + [len(p) for p in payloads[:-1]]).astype(np.int64)
        ts = np.arange(40, dtype=np.uint64) * np.uint64(50_000_000) + np.uint64(99_999_000_000_000)
        out[cpu] = [EventBatch(cpu=cpu, ts=ts + np.uint64(cpu), offset=offs,
                               length=np.array([len(p) for p in payloads], np.int32),
                               type_id=np.full(40, 500, np.uint16), data=b"".join(payloads))]
    slow = b"".join(text_blocks(FakeTrace(out), fast=False))
    assert b" 99999.950000: " in slow and b" 100000.000000: " in slow
    assert b"".join(text_blocks(FakeTrace(out))) == slow
