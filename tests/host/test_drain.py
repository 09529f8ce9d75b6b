"""The drain loop on real FIFOs: byte-exact copies, whole-page drops with exact
accounting when the writer is stuck, the byte cap, and a disk that fills up."""
from __future__ import annotations

import os
import subprocess
import threading
import time

import pytest

from vmtrace.host.drain import Drainer
from vmtrace.tracefs import Tracefs

PAGE = 4096


@pytest.fixture(scope="module")
def real_pages(tmp_path_factory) -> bytes:
    """Real ring-buffer pages read from a private tracefs instance (or, without
    tracefs, numbered synthetic pages; the drain loop does not look inside pages)."""
    try:
        tf = Tracefs.create_instance("vmtrace-host-drain-%d" % os.getpid())
    except Exception:
        return b"".join(i.to_bytes(8, "little") * (PAGE // 8) for i in range(64))
    try:
        tf.buffer_size_kb = 256
        tf.enable_events(["sched", "timer"])
        tf.tracing_on = True
        subprocess.run(["sh", "-c", "for i in $(seq 200); do echo $i > /dev/null; ls / > /dev/null; done"])
        tf.tracing_on = False
        data = bytearray()
        for cpu in tf.cpus():
            fd = os.open(tf.trace_pipe_raw(cpu), os.O_RDONLY | os.O_NONBLOCK)
            try:
                while True:
                    try:
                        chunk = os.read(fd, PAGE)
                    except BlockingIOError:
                        break
                    if not chunk:
                        break
                    data += chunk
            finally:
                os.close(fd)
    finally:
        tf.remove()
    assert len(data) % PAGE == 0 and len(data) >= 4 * PAGE
    # Number every page in its last 8 bytes (padding area) so order can be checked.
    return bytes(data)


def _numbered(n: int) -> bytes:
    return b"".join(i.to_bytes(4, "little") * (PAGE // 4) for i in range(n))


def _feed(w: int, data: bytes, chunk: int, pause_every: int = 0) -> threading.Thread:
    def run():
        fd = os.fdopen(w, "wb", buffering=0)
        pos = 0
        k = 0
        while pos < len(data):
            pos += fd.write(data[pos:pos + chunk])
            k += 1
            if pause_every and k % pause_every == 0:
                time.sleep(0.001)
        fd.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def _finish_reading(dr: Drainer, out_r: int, out_w: int) -> bytes:
    """Let the drainer run to EOF while the output pipe, which nobody read so far, is
    read to its end (closing both ends); return what came out."""
    got = bytearray()

    def reader():
        while True:
            b = os.read(out_r, 1 << 16)
            if not b:
                return
            got.extend(b)

    rt = threading.Thread(target=reader, daemon=True)
    rt.start()
    _wait_eof(dr)
    dr.stop()
    os.close(out_w)
    rt.join(10)
    os.close(out_r)
    return bytes(got)


def _wait_eof(dr: Drainer, timeout: float = 20.0) -> None:
    end = time.monotonic() + timeout
    while not all(s.eof for s in dr.streams):
        assert time.monotonic() < end, "streams did not end"
        time.sleep(0.01)


def _fifo_pair(tmp_path, name):
    path = tmp_path / name
    os.mkfifo(path)
    r = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    w = os.open(path, os.O_WRONLY)
    return r, w


@pytest.mark.tracefs
def test_several_fifos_byte_exact(tmp_path, real_pages):
    """Real pages through FIFOs in odd-sized writes come out byte for byte."""
    dr = Drainer(page_size=PAGE)
    feeders, outs = [], []
    for i, chunk in enumerate((PAGE, 1000, 65536, 4097)):
        r, w = _fifo_pair(tmp_path, "f%d" % i)
        out = os.open(tmp_path / ("o%d" % i), os.O_WRONLY | os.O_CREAT, 0o600)
        outs.append(out)
        dr.add(("g%d" % (i % 2), i), r, out)
        feeders.append((w, chunk))
    dr.start()
    threads = [_feed(w, real_pages * 3, chunk) for w, chunk in feeders]
    for t in threads:
        t.join(20)
    _wait_eof(dr)
    dr.stop()
    for i in range(4):
        os.close(outs[i])
        assert (tmp_path / ("o%d" % i)).read_bytes() == real_pages * 3
    for st in dr.snapshot().values():
        assert st["received"] == st["written"] == len(real_pages) * 3
        assert st["dropped"] == 0 and st["error"] is None


def _check_subsequence(out: bytes, total_pages: int) -> list:
    """Output must be whole numbered pages, each intact, in increasing order; exactly the
    first page after every gap carries the missed-events flag in its commit word."""
    assert len(out) % PAGE == 0
    nums = []
    for i in range(0, len(out), PAGE):
        page = bytearray(out[i:i + PAGE])
        n = int.from_bytes(page[:4], "little")
        commit = int.from_bytes(page[8:12], "little")
        gap = n != (nums[-1] + 1 if nums else 0)
        assert commit == (n | (1 << 31) if gap else n), "page %d: flag %x, gap %s" % (i // PAGE, commit, gap)
        page[8:12] = page[:4]
        assert page == n.to_bytes(4, "little") * (PAGE // 4), "page %d torn" % (i // PAGE)
        nums.append(n)
    assert nums == sorted(set(nums)) and (not nums or nums[-1] < total_pages)
    return nums


@pytest.mark.parametrize("chunk", [PAGE * 4, 100])
def test_stuck_writer_drops_whole_pages_exactly(tmp_path, chunk):
    """The output is a pipe nobody reads (a disk that stopped): the source is still
    emptied, pages are dropped whole, and the counts add up exactly. 100-byte writes
    fill the spill pipe's slots before its bytes, which takes the userspace tail path."""
    total = 600
    data = _numbered(total)
    r, w = _fifo_pair(tmp_path, "src")
    out_r, out_w = os.pipe()  # 64 KiB that nobody reads until the end
    dr = Drainer(page_size=PAGE, spill_bytes=64 << 10)
    s = dr.add(("g", 0), r, out_w)
    dr.start()
    t = _feed(w, data, chunk)
    t.join(30)
    assert not t.is_alive(), "the producer was held up: the guest would stall"
    got = _finish_reading(dr, out_r, out_w)
    st = s.stats()
    nums = _check_subsequence(got, total)
    assert st["received"] == len(data)
    assert st["written"] == len(got)
    assert st["written"] + st["dropped"] == st["received"]
    assert st["dropped"] > 0 and st["dropped"] % PAGE == 0
    assert st["dropped_pages"] == total - len(nums)


def test_byte_cap_per_group(tmp_path):
    total = 100
    data = _numbered(total)
    dr = Drainer(page_size=PAGE)
    dr.group("g", max_bytes=10 * PAGE + 123)
    outs = []
    for i in range(2):
        r, w = _fifo_pair(tmp_path, "c%d" % i)
        out = os.open(tmp_path / ("o%d" % i), os.O_WRONLY | os.O_CREAT, 0o600)
        outs.append(out)
        dr.add(("g", i), r, out)
        _feed(w, data, 3000)
    dr.start()
    _wait_eof(dr)
    dr.stop()
    written = 0
    for i in range(2):
        os.close(outs[i])
        b = (tmp_path / ("o%d" % i)).read_bytes()
        _check_subsequence(b, total)
        written += len(b)
    assert written == 10 * PAGE
    snap = dr.snapshot()
    assert sum(st["dropped_cap"] for st in snap.values()) == 2 * len(data) - written
    assert all(st["written"] + st["dropped"] == st["received"] for st in snap.values())


def test_partial_page_at_end_is_cut(tmp_path):
    r, w = _fifo_pair(tmp_path, "p")
    out = os.open(tmp_path / "o", os.O_WRONLY | os.O_CREAT, 0o600)
    dr = Drainer(page_size=PAGE)
    s = dr.add(("g", 0), r, out)
    dr.start()
    _feed(w, _numbered(3) + b"garbage", 999).join(5)
    _wait_eof(dr)
    dr.stop()
    os.close(out)
    assert (tmp_path / "o").read_bytes() == _numbered(3)
    st = s.stats()
    assert (st["received"], st["written"], st["dropped"]) == (3 * PAGE + 7, 3 * PAGE, 7)


@pytest.mark.tracefs  # needs root to mount a small tmpfs
def test_full_disk_stops_writing_cleanly(tmp_path):
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        errors = []
        r, w = _fifo_pair(tmp_path, "d")
        out = os.open(mnt / "cpu0", os.O_WRONLY | os.O_CREAT, 0o600)
        dr = Drainer(page_size=PAGE, on_error=lambda s, msg: errors.append(msg))
        s = dr.add(("guest1", 0), r, out)
        dr.start()
        t = _feed(w, _numbered(200), 5000)
        t.join(30)
        assert not t.is_alive()
        _wait_eof(dr)
        dr.stop()
        os.close(out)
        b = (mnt / "cpu0").read_bytes()
        nums = _check_subsequence(b, 200)
        assert nums == list(range(len(nums))) and 0 < len(nums) < 200
        assert len(errors) == 1 and "disk full" in errors[0] and "guest1" in errors[0]
        st = s.stats()
        assert st["written"] == len(b) and st["written"] + st["dropped"] == st["received"] == 200 * PAGE
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


def test_bench_drain_smoke(tmp_path):
    """The benchmark's plumbing at a tiny size: both peers run, outputs are verified."""
    from vmtrace.bench.drain import run

    doc = run(seconds=0.3, reps=1, guests=1, streams=2, rate_mb_s=20, base_dir=str(tmp_path),
              progress=lambda msg: None)
    for peer in ("vmtrace", "cat"):
        r = doc["results"][peer]
        assert r["bytes"] > 0 and r["bytes_lost_or_wrong"] == 0 and r["cpu_s"] >= 0
    assert os.listdir(tmp_path) == []


@pytest.mark.tracefs
@pytest.mark.oracle
def test_dropped_pages_show_as_a_drop_marker_in_trace_cmd(tmp_path):
    """Real marker pages through a drain whose disk is stuck: the first page kept after
    the dropped ones carries RB_MISSED_EVENTS, and trace-cmd prints [EVENTS DROPPED]
    exactly there (between the last marker before the gap and the first after it)."""
    import fcntl
    import re

    from vmtrace.agent import metadata
    from vmtrace.format.tracedat_write import write_tracedat

    tf = Tracefs.create_instance("vmtrace-host-drainmark-%d" % os.getpid())
    old_aff = os.sched_getaffinity(0)
    try:
        tf.tracing_on = False
        tf.buffer_size_kb = 2048
        tf.clear()
        tf.tracing_on = True
        cpu = min(tf.cpus())
        os.sched_setaffinity(0, {cpu})
        fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
        try:
            for i in range(3000):
                os.write(fd, b"drainmark %06d " % i + b"x" * 150)
        finally:
            os.close(fd)
        tf.tracing_on = False
        pages = bytearray()
        rfd = os.open(tf.trace_pipe_raw(cpu), os.O_RDONLY | os.O_NONBLOCK)
        try:
            while True:
                try:
                    chunk = os.read(rfd, PAGE)
                except BlockingIOError:
                    break
                if not chunk:
                    break
                pages += chunk
        finally:
            os.close(rfd)
        md = metadata.collect(tf, metadata.meta(tf, [cpu], [], PAGE, {}, {}, None), False)
    finally:
        os.sched_setaffinity(0, old_aff)
        tf.remove()
    assert len(pages) >= 40 * PAGE

    r, w = _fifo_pair(tmp_path, "mark")
    out_r, out_w = os.pipe()
    fcntl.fcntl(out_w, 1031, PAGE)  # F_SETPIPE_SZ: the "disk" takes one page, then sticks
    dr = Drainer(page_size=PAGE, spill_bytes=2 * PAGE, source_pipe_bytes=4 * PAGE)
    s = dr.add(("g", cpu), r, out_w)
    dr.start()
    t = _feed(w, bytes(pages), PAGE)
    t.join(30)
    assert not t.is_alive()
    got = _finish_reading(dr, out_r, out_w)
    st = s.stats()
    assert st["dropped_pages"] > 0 and s.marked >= 1
    cpu_file = tmp_path / "cpu"
    cpu_file.write_bytes(got)
    dat = tmp_path / "marked.dat"
    write_tracedat(str(dat), md, {cpu: str(cpu_file)})
    rep = subprocess.run(["trace-cmd", "report", "-i", str(dat)], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr[-500:]
    lines = rep.stdout.splitlines()
    drops = [i for i, ln in enumerate(lines) if "EVENTS DROPPED" in ln]
    assert len(drops) == s.marked, rep.stdout[-2000:]
    nums = [int(m.group(1)) if m else None for m in (re.search(r"drainmark (\d+)", ln) for ln in lines)]
    for i in drops:
        before = [n for n in nums[:i] if n is not None]
        after = [n for n in nums[i:] if n is not None]
        assert after, "a drop marker with no event after it"
        assert after[0] > (before[-1] + 1 if before else 0), "marker %d not at a gap" % i
    # and nowhere else is a gap
    seen = [n for n in nums if n is not None]
    gaps = sum(1 for a, b in zip([-1] + seen, seen) if b != a + 1)
    assert gaps == len(drops)
