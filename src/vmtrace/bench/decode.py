"""Decode speed against ``trace-cmd report``, and the memory bound of streaming decode.

Three ways through the same trace.dat, alternated within each repetition so that
machine noise (other jobs, CPU frequency) hits all of them alike:

- ``trace-cmd report`` writing text to /dev/null (the reference users know);
- our columnar decode: every page walked and every field of every event decoded into
  numpy arrays, no text (what tables, Parquet and SQL use);
- our text rendering (``vmtrace.format.render``), when that module is present.

Rates are events per second over the same event count, by wall time (``events_per_s``,
our columnar decode uses one thread per CPU) and by CPU time, user+system, children
included (``cpu_events_per_s``). ``params.walker`` says whether the page walk and field
gathers ran in C or in the numpy fallback. The memory check builds a
large raw directory out of a real trace's pages and measures the peak RSS of a fresh
process that streams through it, because that is the number a user with a 1 GB trace
cares about.
"""
from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from vmtrace.errors import VmtraceError

Progress = Optional[Callable[[str], None]]


def _say(progress: Progress, text: str) -> None:
    if progress is not None:
        progress(text)


def decode_cpu_columns(tr: Any, cpu: int, sink: Optional[Callable[[Any, Dict[str, Any]], None]]
                       = None) -> int:
    """Every event of one CPU to typed columns; returns the event count.

    Per decoded chunk and event type: ts, offset, length and type id come from the page
    walk, and every field (common ones included) becomes a numpy column: integers
    as their C types, fixed arrays as 2-D arrays, ``char[N]`` and ``__data_loc``
    strings as fixed-width bytes cut at the first NUL (``S<N>``; text is decoded only
    when asked, :func:`vmtrace.format.events.text_column`), other variable-length
    fields as object arrays. ``sink(fmt, columns)`` receives each part (default: drop).
    """
    from vmtrace.format.columns import batch_columns
    n = 0
    for batch in tr.batches(cpu):
        n += len(batch)
        # Every type of the chunk in one pass (grouped by type, ascending ids).
        for fmt, sel, cols in batch_columns(batch, tr.catalog, common=True,
                                            keep_going=tr.keep_going, strings="bytes"):
            cols["ts"] = batch.ts[sel]
            if sink is not None:
                sink(fmt, cols)
    return n


def columnar_decode(path: str, threads: Optional[int] = None) -> int:
    """All events of all CPUs decoded to typed columns, no text; returns the event count.

    This is what "columnar" measures: every page walked and every field of every event
    of every CPU turned into numpy columns (see :func:`decode_cpu_columns`). CPUs are
    independent streams, so they are decoded in parallel threads (numpy and zstd
    release the GIL for their bulk work), at most one per core.
    """
    import vmtrace
    with vmtrace.open(path) as tr:
        cpus = tr.cpus()
        workers = min(len(cpus), threads or os.cpu_count() or 1)
        if workers <= 1:
            return sum(decode_cpu_columns(tr, c) for c in cpus)
        from concurrent.futures import ThreadPoolExecutor
        with ThreadPoolExecutor(workers) as pool:
            return sum(pool.map(lambda c: decode_cpu_columns(tr, c), cpus))


def header_walk(path: str) -> int:
    """Only the page and record headers (ts, type, offsets): the decoder's floor."""
    import vmtrace
    with vmtrace.open(path) as tr:
        return sum(len(b) for c in tr.cpus() for b in tr.batches(c))


def text_render(path: str) -> Optional[int]:
    """``vmtrace report PATH`` to /dev/null, run the way trace-cmd report is run.

    A subprocess on both sides, so start-up (imports, metadata, format compilation) is
    counted for both, and the text is what the command really prints (its bulk
    renderer), not a library loop a user never runs.
    """
    try:
        subprocess.run([sys.executable, "-m", "vmtrace", "report", path], stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, check=True, timeout=3600)
    except subprocess.CalledProcessError as exc:
        raise VmtraceError("bench decode: vmtrace report %s failed: %s"
                           % (path, exc.stderr.decode(errors="replace").strip()[-200:]))
    return 1


def _cpu_seconds() -> float:
    """User+system CPU time of this process (all threads) and of its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def trace_cmd_report(path: str) -> None:
    subprocess.run(["trace-cmd", "report", "-i", path], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, check=True, timeout=3600)


def run(trace_path: Any, reps: int = 3, progress: Progress = None,
        rss_bytes: Optional[int] = None) -> Dict[str, Any]:
    """Measure the three decoders on ``trace_path``; optionally the streaming RSS check.

    Returns ``{"params": ..., "results": {name: {"events_per_s", "seconds": [...]}},
    "ratios": ...}`` (plus ``"rss"`` when ``rss_bytes`` is given).
    """
    path = os.fspath(trace_path)
    if not os.path.isfile(path):
        raise VmtraceError(f"bench decode: {path}: no such file")
    import vmtrace
    with vmtrace.open(path) as tr:
        n_events = tr.stats()["events"]
    if n_events == 0:
        raise VmtraceError(f"bench decode: {path}: the trace has no events")
    runners: Dict[str, Callable[[], Any]] = {
        "header walk": lambda: header_walk(path),
        "vmtrace columnar": lambda: columnar_decode(path),
    }
    if shutil.which("trace-cmd"):
        runners["trace-cmd report"] = lambda: trace_cmd_report(path)
    if text_render(path) is not None:   # also warms caches before timing
        runners["vmtrace text"] = lambda: text_render(path)
    times: Dict[str, List[float]] = {k: [] for k in runners}
    cpu: Dict[str, List[float]] = {k: [] for k in runners}
    for rep in range(max(1, reps)):
        order = list(runners) if rep % 2 == 0 else list(reversed(runners))
        for name in order:
            _say(progress, f"decode rep {rep + 1}/{reps}: {name}")
            c0 = _cpu_seconds()
            t0 = time.perf_counter()
            runners[name]()
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(_cpu_seconds() - c0)
    results = {name: {"events": n_events, "seconds": ts,
                      "events_per_s": n_events / statistics.median(ts),
                      "cpu_seconds": cpu[name],
                      "cpu_events_per_s": n_events / max(statistics.median(cpu[name]), 1e-9)}
               for name, ts in times.items()}
    from vmtrace.format.ringbuffer import walker
    doc: Dict[str, Any] = {"benchmark": "decode",
                           "params": {"trace": path, "reps": reps, "events": n_events,
                                      "walker": walker()},
                           "results": results}
    _say(progress, f"page walk and field gather: {walker()}"
         + ("" if walker() == "c" else " (the C extension vmtrace.format._walk is not built)"))
    ref = results.get("trace-cmd report")
    if ref:
        doc["ratios"] = {f"{k} / trace-cmd report": v["events_per_s"] / ref["events_per_s"]
                         for k, v in results.items() if k != "trace-cmd report"}
        doc["cpu_ratios"] = {f"{k} / trace-cmd report": v["cpu_events_per_s"]
                             / ref["cpu_events_per_s"]
                             for k, v in results.items() if k != "trace-cmd report"}
    if rss_bytes:
        doc["rss"] = streaming_rss(path, rss_bytes, progress=progress)
    return doc


def make_big_rawdir(trace_path: str, out_dir: str, target_bytes: int) -> Dict[str, Any]:
    """A raw directory of about ``target_bytes`` made by repeating a real trace's pages.

    Timestamps repeat from copy to copy; the decoder's memory use does not depend on
    them, and every page is a real kernel page.
    """
    from vmtrace.format.rawdir import write_rawdir
    from vmtrace.sources import open_source, source_metadata
    with open_source(trace_path) as src:
        md = source_metadata(src)
        buf = next((b for b in src.buffers if any(c.size for c in b.cpus)), None)
        if buf is None:
            raise VmtraceError(f"{trace_path}: no trace data to repeat")
        pages = {c.cpu: b"".join(bytes(p) for p in c.pages()) for c in buf.cpus if c.size}
        page_size = src.page_size
        endian = "little" if src.endian in ("<", "little") else "big"
        long_size = src.long_size
        clock = buf.clock or "local"
    per_cpu = max(page_size, target_bytes // max(1, len(pages)))
    md["meta.json"] = (
        '{"layout": "vmtrace-raw", "layout_version": 1, "page_size": %d, "long_size": %d, '
        '"endian": "%s", "clock": "%s", "cpus": %s, "nr_cpus": %d}'
        % (page_size, long_size, endian, clock, sorted(pages), max(pages) + 1)).encode()

    def repeat(data: bytes):
        left = per_cpu
        while left > 0:
            chunk = data[:left] if len(data) > left else data
            yield chunk
            left -= len(chunk)

    write_rawdir(out_dir, md, {cpu: repeat(data) for cpu, data in pages.items()})
    total = sum(os.path.getsize(os.path.join(out_dir, f"cpu{c}")) for c in pages)
    return {"bytes": total, "cpus": len(pages)}


# VmHWM, not ru_maxrss: a child's ru_maxrss starts at the size of the parent it was
# forked from (the copy counts until exec); VmHWM belongs to the exec'd image alone.
_CHILD = r"""
import sys, time
import vmtrace
t = time.perf_counter()
with vmtrace.open(sys.argv[1]) as tr:
    st = tr.stats()
took = time.perf_counter() - t
hwm = [l.split()[1] for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
print(st["events"], took, hwm)
"""


RSS_KINDS = ("rawdir", "v6", "v7", "v7-zstd")


def streaming_rss(trace_path: str, target_bytes: int = 1 << 30, *, progress: Progress = None,
                  workdir: Optional[str] = None, kind: str = "rawdir") -> Dict[str, Any]:
    """Peak RSS (MB) of a fresh process decoding a ~``target_bytes`` trace.

    ``kind`` is the container: the raw directory itself, or a trace.dat written from it
    (v6, v7 uncompressed, v7 zstd; ``bytes`` is then the uncompressed page data).
    """
    if kind not in RSS_KINDS:
        raise VmtraceError(f"bench decode: unknown container {kind!r} ({', '.join(RSS_KINDS)})")
    tmp = tempfile.mkdtemp(prefix="vmtrace-bench-rss-", dir=workdir)
    try:
        _say(progress, f"writing a {target_bytes >> 20} MB raw directory")
        raw = os.path.join(tmp, "raw")
        info = make_big_rawdir(trace_path, raw, target_bytes)
        target = raw
        if kind != "rawdir":
            from vmtrace.format.tracedat_write import write_tracedat
            from vmtrace.format.rawdir import read_rawdir
            _say(progress, f"writing it as a {kind} trace.dat")
            md = {}
            base = Path(raw) / "metadata"
            for f in base.rglob("*"):
                if f.is_file():
                    md[f.relative_to(base).as_posix()] = f.read_bytes()
            with read_rawdir(raw) as src:
                cpus = {c.cpu: os.path.join(raw, f"cpu{c.cpu}") for c in src.buffers[0].cpus}
            target = os.path.join(tmp, "trace.dat")
            write_tracedat(target, md, cpus, version=6 if kind == "v6" else 7,
                           compression="zstd" if kind == "v7-zstd" else None)
            shutil.rmtree(raw)
        _say(progress, "decoding it in a fresh process")
        # The child reports its own peak (VmHWM, KB): nothing else counts.
        proc = subprocess.run([sys.executable, "-c", _CHILD, target],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=3600)
        if proc.returncode != 0:
            raise VmtraceError("bench decode: streaming decode failed: "
                               + (proc.stderr.decode(errors="replace").strip().splitlines()
                                  or ["?"])[-1])
        events, seconds, maxrss = proc.stdout.split()
        return {"kind": kind, "bytes": info["bytes"], "file_bytes": _size(target),
                "events": int(events), "seconds": float(seconds),
                "events_per_s": int(events) / max(float(seconds), 1e-9),
                "peak_rss_mb": int(maxrss) / 1024.0}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())
    return os.path.getsize(path)
