"""Ring-buffer page decoding: hand-built pages for each record type, real pages from a
private tracefs instance (counts checked against the kernel's own per-CPU stats), and
corrupt pages (one clear FormatError, or keep-going that skips only the broken page)."""
from __future__ import annotations

import os
import struct
import subprocess

import numpy as np
import pytest

from vmtrace.errors import FormatError
from vmtrace.format.ringbuffer import (check_header_event, decode_pages, iter_batches,
                                       layout_from_headers, parse_header_page)

from pages import HEADER_EVENT, HEADER_PAGE, LAYOUT, PageBuilder, payload

def test_header_texts_of_this_machine_parse():
    from vmtrace.tracefs import Tracefs
    if not os.path.exists("/sys/kernel/tracing/events/header_page"):
        pytest.skip("needs tracefs")
    tf = Tracefs()
    lay = layout_from_headers(tf.header_page(), tf.header_event())
    assert (lay.page_size, lay.commit_offset, lay.commit_size, lay.data_offset) == (4096, 8, 8, 16)


def test_header_page_32bit_and_errors():
    text = HEADER_PAGE.replace(b"size:8;\tsigned:1", b"size:4;\tsigned:1").replace(b"offset:16", b"offset:12")
    lay = parse_header_page(text, page_size=4096)
    assert (lay.commit_size, lay.data_offset) == (4, 12)
    with pytest.raises(FormatError, match="no 'commit' field"):
        parse_header_page(b"\tfield: u64 timestamp;\toffset:0;\tsize:8;\tsigned:0;\n")
    with pytest.raises(FormatError, match="bad page size"):
        parse_header_page(HEADER_PAGE, page_size=1 << 30)
    with pytest.raises(FormatError, match="unsupported"):
        check_header_event(HEADER_EVENT.replace(b"5 bits", b"6 bits"))


def test_every_record_kind_in_one_page():
    b = PageBuilder(ts=1_000_000)
    b.data(payload(7, 11), delta=5)                       # small record
    b.extend(1 << 30)                                     # long delta
    b.data(payload(8, 12, b"x" * 200), delta=3)           # big record (length in array[0])
    b.discarded(24, delta=2)                              # discarded event keeps its delta
    b.data(payload(9, 13), delta=1)
    b.stamp(5_000_000_000)                                # absolute time stamp
    b.data(payload(10, 14), delta=4)
    page = b.page(null_pad=True)
    batch = decode_pages(page, LAYOUT, cpu=3)
    t1 = 1_000_005
    t2 = t1 + (1 << 30) + 3
    assert batch.cpu == 3
    assert batch.ts.tolist() == [t1, t2, t2 + 2 + 1, 5_000_000_004]
    assert batch.type_id.tolist() == [7, 8, 9, 10]
    assert batch.length.tolist() == [8, 208, 8, 8]
    assert [bytes(batch.payload(i))[4:8] for i in range(4)] == [struct.pack("<i", p) for p in (11, 12, 13, 14)]
    assert batch.lost == [] and batch.problems == []


def test_lost_events_marks_and_page_order_across_pages():
    pages = [PageBuilder(100).data(payload(1, 1)).data(payload(1, 2), delta=1).page(),
             PageBuilder(200).data(payload(2, 3)).page(missed=42),
             PageBuilder(300).data(payload(3, 4)).page(missed=-1),
             PageBuilder(400).page()]                      # empty page (commit 0)
    batch = decode_pages(b"".join(pages), LAYOUT)
    assert batch.ts.tolist() == [100, 101, 200, 300]
    assert [(m.index, m.count, m.ts) for m in batch.lost] == [(2, 42, 200), (3, -1, 300)]
    # Chunked streaming gives the same events as one call.
    got = [int(t) for bt in iter_batches(iter(pages), LAYOUT, chunk_pages=1) for t in bt.ts]
    assert got == [100, 101, 200, 300]


@pytest.mark.parametrize("mutate, what", [
    (lambda p: p[:8] + struct.pack("<Q", 5000) + p[16:], "commit 5000 is larger"),
    (lambda p: p[:8] + struct.pack("<Q", 10) + p[16:], "runs past the commit"),
    (lambda p: p[:16] + struct.pack("<II", 0, 4000) + p[24:], "runs past the commit"),
    (lambda p: p[:16] + struct.pack("<II", 0, 4) + p[24:], "too short"),
    (lambda p: p[:-1], "not a whole page"),
])
def test_corrupt_pages(mutate, what):
    good = PageBuilder(50).data(payload(1, 1)).data(payload(2, 2), delta=1).page()
    bad = mutate(good)
    with pytest.raises(FormatError, match=what) as ei:
        decode_pages(good + bad, LAYOUT, source="cpu0.raw", base_offset=8192)
    assert "cpu0.raw" in str(ei.value) and ei.value.offset >= 8192 + 4096
    batch = decode_pages(good + bad + good, LAYOUT, keep_going=True)
    assert len(batch.problems) == 1 and what in batch.problems[0].what
    assert batch.ts.tolist()[:2] == [50, 51] and batch.ts.tolist()[-2:] == [50, 51]


def _capture_raw(tmp_path, events, workload, name, buffer_kb=512):
    """Read every page of a private instance's trace_pipe_raw files (real kernel pages)."""
    from vmtrace.tracefs import Tracefs, is_eagain
    tf = Tracefs.create_instance(name)
    try:
        tf.tracing_on = False
        tf.buffer_size_kb = buffer_kb
        tf.enable_events(events)
        tf.clear()
        tf.tracing_on = True
        subprocess.run(["sh", "-c", workload], check=False, timeout=60)
        tf.tracing_on = False
        out = {}
        for cpu in tf.cpus():
            chunks = []
            fd = os.open(tf.trace_pipe_raw(cpu), os.O_RDONLY | os.O_NONBLOCK)
            try:
                while True:
                    try:
                        b = os.read(fd, 4096)
                    except OSError as exc:
                        if is_eagain(exc):
                            break
                        raise
                    if not b:
                        break
                    chunks.append(b)
            finally:
                os.close(fd)
            out[cpu] = (b"".join(chunks), tf.cpu_stats(cpu))
        return tf.header_page(), tf.header_event(), out
    finally:
        tf.remove()


@pytest.mark.tracefs
def test_real_pages_match_kernel_counts(tmp_path):
    hp, he, per_cpu = _capture_raw(
        tmp_path, ["sched", "timer", "kmem", "irq", "syscalls"],
        f"for i in $(seq 10); do ls / > /dev/null; echo $i > {tmp_path}/f; sleep 0.002; done",
        f"vmtrace-decoder-rb-{os.getpid()}", buffer_kb=4096)
    lay = layout_from_headers(hp, he)
    total = 0
    for cpu, (raw, stats) in per_cpu.items():
        batch = decode_pages(raw, lay, cpu, source=f"cpu{cpu}")
        assert len(batch) == stats.read_events, (cpu, stats)
        assert (np.diff(batch.ts.astype(np.int64)) >= 0).all()
        # The kernel stores the missed count after the data only when the page has
        # room; otherwise the page is flagged with the count unknown (-1).
        known = sum(m.count for m in batch.lost if m.count > 0)
        if any(m.count < 0 for m in batch.lost):
            assert stats.overrun >= known, (cpu, stats, batch.lost)
        else:
            assert known == stats.overrun, (cpu, stats, batch.lost)
        total += len(batch)
    assert total > 100
