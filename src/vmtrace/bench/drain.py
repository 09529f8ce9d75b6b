"""`vmtrace bench drain`: the host drain loop against one `cat` per FIFO, in one run.

What it stands for: G guests x S vCPU streams of ring-buffer pages arriving on FIFOs,
as QEMU's pipe chardevs deliver them. Producers (one process per guest) ``splice`` a
file of pages into their FIFOs as fast as the consumer takes them, for a fixed time,
and report exactly how many bytes they sent. The consumer is either

* ``vmtrace``: :class:`vmtrace.host.drain.Drainer` in a child process of its own, so
  its CPU time (user + system, all threads) is measured alone, or
* ``cat``: the seed's host side, ``cat trace-path-cpuN.out > file``, one per FIFO.

Both write into a fresh directory (tmpfs by default, so the disk's speed is not what
is measured). Afterwards every output file is compared byte for byte with what its
producer sent: "zero bytes lost" is checked, not assumed.

Figures: aggregate MB/s (bytes sent / time from the start signal to the last byte on
disk) and consumer CPU as % of one core per 100 MB/s. Producers share the 2 cores
with the consumer, so the aggregate rate is a property of the whole machine; the CPU
figure is the consumer's own.
"""
from __future__ import annotations

import json
import os
import resource
import select
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional

from vmtrace.errors import VmtraceError

PAGE = 4096
SOURCE_BYTES = 4 << 20
MB = 1_000_000


def _stream_offset(index: int) -> int:
    """Where stream ``index`` starts in the source file: streams carry different bytes."""
    return (index * 37 * PAGE) % SOURCE_BYTES


def _fifo(d: str, g: int, c: int) -> str:
    return os.path.join(d, "g%d" % g, "trace-path-cpu%d.out" % c)


# -- producer (child process): one guest's CPUs ------------------------------------------

def _produce(source: str, fifos: List[str], first_index: int, go_ns: int, seconds: float, rate: float) -> None:
    """Offer ``rate`` bytes/s per FIFO, like a guest whose tracing makes that much data.

    A paced producer is the honest model: a guest does not produce infinitely fast, and
    a consumer that never pushes back (ours) must be judged on whether it takes the
    offered load without loss, while one that pushes back (cat) shows up as a producer
    that fell behind its offer ("stalled").
    """
    src = os.open(source, os.O_RDONLY)
    fds = []
    for path in fifos:
        fd = os.open(path, os.O_WRONLY)  # waits for the consumer, as QEMU would
        os.set_blocking(fd, False)
        fds.append(fd)
    offs = {fd: _stream_offset(first_index + i) for i, fd in enumerate(fds)}
    sent = {fd: 0 for fd in fds}
    ep = select.epoll()
    for fd in fds:
        ep.register(fd, select.EPOLLOUT)
    while time.monotonic_ns() < go_ns:
        time.sleep(max(0.0, (go_ns - time.monotonic_ns()) / 1e9))
    end = go_ns + int(seconds * 1e9)
    per_ns = rate / 1e9
    while True:
        now = time.monotonic_ns()
        if now >= end:
            break
        allowed = int((now - go_ns) * per_ns)
        allowed -= allowed % PAGE
        behind = [fd for fd in fds if sent[fd] < allowed]
        if not behind:
            time.sleep(0.001)
            continue
        for fd, _ in ep.poll(0.05):
            if sent[fd] >= allowed:
                continue
            off = offs[fd]
            try:
                n = os.splice(src, fd, min(256 << 10, SOURCE_BYTES - off, allowed - sent[fd]), offset_src=off,
                              flags=os.SPLICE_F_NONBLOCK | os.SPLICE_F_MOVE)
            except BlockingIOError:
                continue
            offs[fd] = (off + n) % SOURCE_BYTES
            sent[fd] += n
    for fd in fds:
        os.close(fd)
    json.dump([sent[fd] for fd in fds], sys.stdout)


# -- the vmtrace consumer (child process) ---------------------------------------------

def _record(fifo_dir: str, guests: int, streams: int, out_dir: str) -> None:
    from vmtrace.host.drain import Drainer

    t0 = resource.getrusage(resource.RUSAGE_SELF)
    dr = Drainer(page_size=PAGE)
    outs = []
    for g in range(guests):
        for c in range(streams):
            src = os.open(_fifo(fifo_dir, g, c), os.O_RDONLY | os.O_NONBLOCK)
            out = os.open(os.path.join(out_dir, "g%d-cpu%d" % (g, c)), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            outs.append(out)
            dr.add(("g%d" % g, c), src, out)
    print("ready", flush=True)
    dr.start()
    while not all(s.eof for s in dr.streams):
        time.sleep(0.02)
    dr.stop()
    for fd in outs:
        os.close(fd)
    end_ns = time.monotonic_ns()
    t1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (t1.ru_utime - t0.ru_utime) + (t1.ru_stime - t0.ru_stime)
    print(json.dumps({"end_ns": end_ns, "cpu_s": cpu, "user_s": t1.ru_utime - t0.ru_utime,
                      "totals": dr.totals()}), flush=True)


# -- one measured run -------------------------------------------------------------------

def _make_source(path: str) -> None:
    with open(path, "wb") as f:
        f.write(os.urandom(SOURCE_BYTES))


def _verify(source: bytes, out_dir: str, names: List[str], sent: List[int]) -> int:
    """Compare every output with what was sent; return the number of bytes that differ."""
    bad = 0
    for i, (name, n) in enumerate(zip(names, sent)):
        path = os.path.join(out_dir, name)
        size = os.path.getsize(path) if os.path.exists(path) else 0
        if size != n:
            bad += abs(size - n) or 1
            continue
        off = _stream_offset(i)
        with open(path, "rb") as f:
            pos = 0
            while pos < n:
                take = min(1 << 20, n - pos, SOURCE_BYTES - off)
                if f.read(take) != source[off:off + take]:
                    bad += take
                pos += take
                off = (off + take) % SOURCE_BYTES
    return bad


def _one_run(peer: str, base: str, source_path: str, guests: int, streams: int, seconds: float,
             rate_mb_s: float) -> Dict[str, Any]:
    fifo_dir = tempfile.mkdtemp(prefix="fifos-", dir=base)
    out_dir = tempfile.mkdtemp(prefix="out-%s-" % peer, dir=base)
    names = []
    for g in range(guests):
        os.mkdir(os.path.join(fifo_dir, "g%d" % g))
        for c in range(streams):
            os.mkfifo(_fifo(fifo_dir, g, c), 0o600)
            names.append("g%d-cpu%d" % (g, c))
    env = dict(os.environ)
    consumer: Any
    cats: List[int] = []
    if peer == "vmtrace":
        consumer = subprocess.Popen(
            [sys.executable, "-m", "vmtrace.bench.drain", "record", fifo_dir, str(guests), str(streams), out_dir],
            stdout=subprocess.PIPE, text=True, env=env)
        if consumer.stdout.readline().strip() != "ready":
            consumer.kill()
            raise VmtraceError("bench drain: the recorder child did not start")
    else:
        for g in range(guests):
            for c in range(streams):
                with open(os.path.join(out_dir, "g%d-cpu%d" % (g, c)), "wb") as out:
                    cats.append(subprocess.Popen(["cat", _fifo(fifo_dir, g, c)], stdout=out).pid)
    go_ns = time.monotonic_ns() + int(0.5e9)
    producers = [
        subprocess.Popen(
            [sys.executable, "-m", "vmtrace.bench.drain", "produce", source_path, str(g * streams), str(go_ns),
             str(seconds), str(rate_mb_s * MB / (guests * streams))] + [_fifo(fifo_dir, g, c) for c in range(streams)],
            stdout=subprocess.PIPE, text=True, env=env)
        for g in range(guests)
    ]
    sent: List[int] = []
    for p in producers:
        out, _ = p.communicate(timeout=seconds + 60)
        sent.extend(json.loads(out))
    if peer == "vmtrace":
        out, _ = consumer.communicate(timeout=120)
        info = json.loads(out.strip().splitlines()[-1])
        end_ns, cpu = info["end_ns"], info["cpu_s"]
        extra = {"user_s": info["user_s"], "dropped": info["totals"]["dropped"]}
    else:
        cpu = 0.0
        extra = {"user_s": 0.0}
        for pid in cats:
            _, _, ru = os.wait4(pid, 0)
            cpu += ru.ru_utime + ru.ru_stime
            extra["user_s"] += ru.ru_utime
        end_ns = time.monotonic_ns()
    wall = (end_ns - go_ns) / 1e9
    total = sum(sent)
    with open(source_path, "rb") as f:
        source = f.read()
    bad = _verify(source, out_dir, names, sent)
    shutil.rmtree(fifo_dir, ignore_errors=True)
    shutil.rmtree(out_dir, ignore_errors=True)
    mbps = total / MB / wall
    return {"bytes": total, "wall_s": wall, "MB_s": mbps, "cpu_s": cpu,
            "offered_MB": rate_mb_s * seconds, "short_of_offer_pct": 100.0 * (1 - total / (rate_mb_s * MB * seconds)),
            "cpu_pct_per_100MBs": (cpu / wall * 100.0) / (mbps / 100.0) if mbps else None,
            "bytes_lost_or_wrong": bad, **extra}


def run(seconds: Optional[float] = None, reps: Optional[int] = None, quick: bool = False, guests: int = 8,
        streams: int = 8, rate_mb_s: float = 1100.0, base_dir: Optional[str] = None,
        progress: Optional[Callable[[str], None]] = None) -> Dict[str, Any]:
    """Measure the drain loop and the `cat` peer, alternating, and return the figures."""
    seconds = seconds if seconds is not None else (1.0 if quick else 3.0)
    reps = reps if reps is not None else (1 if quick else 3)
    if seconds <= 0 or reps < 1 or guests < 1 or streams < 1:
        raise VmtraceError("bench drain: seconds, reps, guests and streams must be positive")
    if not rate_mb_s > 0:
        raise VmtraceError("bench drain: --rate must be a positive number of MB/s")
    if guests * streams > 128:
        # the consumer holds four descriptors per stream (FIFO, spill pipe, file)
        raise VmtraceError("bench drain: %d guests x %d streams is more than 128 FIFOs" % (guests, streams))
    parent = base_dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    base = tempfile.mkdtemp(prefix="vmtrace-bench-drain-", dir=parent)
    say = progress or (lambda msg: print(msg, file=sys.stderr))
    results: Dict[str, Dict[str, Any]] = {"vmtrace": {}, "cat": {}}
    runs: Dict[str, List[Dict[str, Any]]] = {"vmtrace": [], "cat": []}
    try:
        source_path = os.path.join(base, "pages")
        _make_source(source_path)
        for rep in range(reps):
            order = ("vmtrace", "cat") if rep % 2 == 0 else ("cat", "vmtrace")
            for peer in order:
                say("drain: rep %d/%d, %s, %d guests x %d streams, %.1f s" % (rep + 1, reps, peer, guests, streams, seconds))
                runs[peer].append(_one_run(peer, base, source_path, guests, streams, seconds, rate_mb_s))
    finally:
        shutil.rmtree(base, ignore_errors=True)
    for peer, rs in runs.items():
        results[peer] = {
            "samples": [r["MB_s"] for r in rs],
            "MB_s": statistics.median(r["MB_s"] for r in rs),
            "cpu_pct_per_100MBs": statistics.median(r["cpu_pct_per_100MBs"] or 0.0 for r in rs),
            "cpu_s": statistics.median(r["cpu_s"] for r in rs),
            "bytes_lost_or_wrong": sum(r["bytes_lost_or_wrong"] for r in rs),
            "bytes": sum(r["bytes"] for r in rs),
            "short_of_offer_pct": statistics.median(r["short_of_offer_pct"] for r in rs),
        }
    return {"benchmark": "drain", "params": {"guests": guests, "streams": streams, "offered_MB_s": rate_mb_s, "seconds": seconds, "reps": reps,
                                            "page_size": PAGE, "out_fs": parent or tempfile.gettempdir()},
            "results": results, "runs": runs,
            "targets": {"MB_s": ">= 1000", "cpu_pct_per_100MBs": "<= 5", "bytes_lost_or_wrong": "0"}}


if __name__ == "__main__":
    what = sys.argv[1]
    if what == "produce":
        _produce(sys.argv[2], sys.argv[7:], int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6]))
    elif what == "record":
        _record(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5])
    else:
        sys.exit("usage: python -m vmtrace.bench.drain produce|record ...")
