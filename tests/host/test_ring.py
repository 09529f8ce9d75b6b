"""host/ring.py, the flight recorder's bounded per-stream store, on real ring-buffer pages
of this machine (the conftest's real_trace): what a window keeps is exactly the newest
pages of the stream, they decode to exactly the newest events, and a snapshot taken
while the writer reuses slots never carries a torn page."""
from __future__ import annotations

import os
import random

import pytest

from vmtrace import api
from vmtrace.errors import VmtraceError
from vmtrace.format.ringbuffer import decode_pages
from vmtrace.host.ring import RingFile, parse_ring


@pytest.fixture(scope="module")
def pages(real_trace):
    """(layout, cpu, [page bytes]) of the real trace's busiest CPU."""
    t = api.open(str(real_trace))
    try:
        buf = next(b for b in t.source.buffers if any(c.size for c in b.cpus))
        c = max(buf.cpus, key=lambda c: c.size)
        got = [bytes(p) for p in c.pages()]
        assert len(got) >= 12, "the real trace is too small for these tests"
        return t.layout, c.cpu, got
    finally:
        t.close()


def _events(layout, cpu, data: bytes):
    b = decode_pages(data, layout, cpu)
    return [(int(ts), b.payload(i).tobytes()) for i, ts in enumerate(b.ts)]


def _stream(ring, pages, rng):
    """Write pages as the drain does: in chunks of any size, not page aligned."""
    data = b"".join(pages)
    i = 0
    while i < len(data):
        n = rng.randint(1, 3 * ring.page_size)
        ring.write(data[i:i + n])
        i += n


def test_keeps_exactly_the_newest_pages(pages, tmp_path):
    layout, cpu, pp = pages
    ps = layout.page_size
    slots = 8
    ring = RingFile(str(tmp_path / "ring"), slots * ps + 123, ps)     # rounded down to pages
    assert ring.capacity == slots * ps
    _stream(ring, pp, random.Random(1))
    assert ring.complete_pages == len(pp)
    assert ring.dropped_pages == len(pp) - slots
    out = tmp_path / "cpu0"
    with open(out, "wb") as f:
        n, torn = ring.copy_window(f.fileno())
    assert (n, torn) == (slots, 0)
    assert out.read_bytes() == b"".join(pp[-slots:])
    # ...and they decode to the newest events of the stream, in order
    assert _events(layout, cpu, out.read_bytes()) == _events(layout, cpu, b"".join(pp[-slots:]))
    assert os.path.getsize(ring.path) == ring.capacity        # bounded on disk
    ring.close()


def test_a_page_in_progress_is_not_in_the_window(pages, tmp_path):
    layout, cpu, pp = pages
    ps = layout.page_size
    ring = RingFile(str(tmp_path / "ring"), 4 * ps, ps)
    ring.write(b"".join(pp[:6]) + pp[6][:100])
    # 6 complete pages and a started one: the started page holds a slot, 3 complete kept
    assert ring.dropped_pages == 3
    assert ring.window().seqs == (3, 4, 5)
    with open(tmp_path / "cpu0", "wb") as f:
        assert ring.copy_window(f.fileno()) == (3, 0)
    assert (tmp_path / "cpu0").read_bytes() == b"".join(pp[3:6])


def test_last_ns_picks_pages_by_their_time(pages, tmp_path):
    layout, cpu, pp = pages
    ps = layout.page_size
    ring = RingFile(str(tmp_path / "ring"), len(pp) * ps, ps)
    ring.write(b"".join(pp))
    stamps = [int.from_bytes(p[:8], "little") for p in pp]
    assert stamps == sorted(stamps) and stamps[-1] > stamps[0]
    span = (stamps[-1] - stamps[len(pp) // 2])
    win = ring.window(last_ns=span)
    want = [i for i, s in enumerate(stamps) if s + span >= stamps[-1]]
    assert list(win.seqs) == want and win.skipped == len(pp) - len(want)
    assert ring.window(last_ns=0).seqs[-1] == len(pp) - 1
    with pytest.raises(VmtraceError, match="negative"):
        ring.window(last_ns=-1)


def test_a_snapshot_never_carries_a_page_the_writer_reused(pages, tmp_path, monkeypatch):
    """The writer wraps over the window while the snapshot copies it: pages whose slot
    was (or was about to be) rewritten are dropped and counted, the rest are intact."""
    layout, cpu, pp = pages
    ps = layout.page_size
    ring = RingFile(str(tmp_path / "ring"), 6 * ps, ps)
    ring.write(b"".join(pp[:6]))
    real_pread = os.pread
    calls = []

    def pread_then_write(fd, n, off):
        data = real_pread(fd, n, off)
        if fd == ring.fd and n == ps and not calls:
            calls.append(off)
            ring.write(pp[6] + pp[7] + pp[8][:10])    # the writer runs between the reads
        return data

    monkeypatch.setattr(os, "pread", pread_then_write)
    with open(tmp_path / "cpu0", "wb") as f:
        n, torn = ring.copy_window(f.fileno())
    monkeypatch.undo()
    # the window was pages 0-5; pages 0-2's slots now hold 6, 7 and the start of 8
    assert (n, torn) == (3, 3) and ring.torn == 3
    assert (tmp_path / "cpu0").read_bytes() == b"".join(pp[3:6])


def test_a_claimed_write_counts_before_its_bytes_land(pages, tmp_path):
    layout, cpu, pp = pages
    ps = layout.page_size
    ring = RingFile(str(tmp_path / "ring"), 4 * ps, ps)
    ring.write(b"".join(pp[:4]))
    off, n = ring.place(ps)            # the writer is about to splice into slot 0
    assert (off, n) == (0, ps)
    with open(tmp_path / "cpu0", "wb") as f:
        assert ring.copy_window(f.fileno()) == (3, 1)      # page 0 may be torn: left out


def test_bad_sizes_and_ring_options(tmp_path):
    with pytest.raises(VmtraceError, match="at least 2"):
        RingFile(str(tmp_path / "r"), 4096, 4096)
    with pytest.raises(VmtraceError, match="power of two"):
        RingFile(str(tmp_path / "r"), 1 << 20, 3000)
    assert parse_ring("5m") == ("ns", 300 * 10**9)
    assert parse_ring("250ms") == ("ns", 250 * 10**6)
    assert parse_ring("64M") == ("bytes", 64 << 20)
    assert parse_ring("2GiB") == ("bytes", 2 << 30)
    for bad in ("64", "-5m", "0s", "5x", "", "9" * 30 + "G"):
        with pytest.raises(VmtraceError, match="--ring"):
            parse_ring(bad)
