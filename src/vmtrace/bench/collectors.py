"""The collectors the overhead benchmark puts beside ftrace, one class each.

Each collector is started after tracing is switched on and stopped after the workload
ends. A collector reports what only it can know (its own CPU time, the bytes it
wrote, the events it saw lost); the ring buffer's own counters are read by the caller,
so every collector is judged by the same ``per_cpu/cpuN/stats``.

CPU time comes from ``wait4`` on the collector process, which the kernel fills with
the child's user+system time over all its threads (and its reaped children), i.e. the
full price the guest pays for the collector, including its shutdown drain.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import Tracefs

NAMES = ("off", "native", "vmtrace", "seedlike", "copy", "text")


@dataclass
class RunContext:
    """What a collector needs to know about one run."""

    tracefs: Tracefs
    outdir: Path                 # empty directory for this run's output
    cpus: List[int]              # CPUs of the trace instance
    reader_cpus: List[int]       # CPUs kept free of the workload (where a reader may run)
    peers: Dict[str, Path] = field(default_factory=dict)


@dataclass
class CollectorReport:
    cpu_seconds: Optional[float] = None   # None: no process (off, native)
    bytes: Optional[int] = None
    lost_reported: Optional[int] = None   # the collector's own count, where it keeps one
    note: str = ""
    tids: Optional[List[int]] = None      # its threads once ready: whose events are its own
    raw_output: bool = False              # outdir holds cpuN files of raw pages


class Child:
    """A collector process whose resource usage we collect ourselves with wait4."""

    def __init__(self, argv: Sequence[str], stdout=None, stderr=None):
        self.argv = list(argv)
        self._err = stderr
        try:
            self.proc = subprocess.Popen(self.argv, stdout=stdout or subprocess.DEVNULL,
                                         stderr=stderr or subprocess.DEVNULL, stdin=subprocess.DEVNULL)
        except OSError as exc:
            raise VmtraceError("cannot start %s: %s" % (self.argv[0], exc.strerror))
        self.status: Optional[int] = None
        self.cpu_seconds = 0.0

    def alive(self) -> bool:
        return self.status is None and self._reap(os.WNOHANG)

    def _reap(self, flags: int) -> bool:
        """wait4 once; return True while the child still runs."""
        try:
            pid, status, ru = os.wait4(self.proc.pid, flags)
        except ChildProcessError:
            self.status = self.status if self.status is not None else -1
            return False
        if pid == 0:
            return True
        self.status = status
        self.cpu_seconds = ru.ru_utime + ru.ru_stime
        self.proc.returncode = os.waitstatus_to_exitcode(status)  # keep Popen from waiting again
        return False

    def stop(self, sig: int = signal.SIGINT, timeout: float = 10.0) -> float:
        """Signal the child, wait up to ``timeout`` (then SIGKILL); return its CPU seconds."""
        if self.status is None and self._reap(os.WNOHANG):
            try:
                os.kill(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            deadline = time.monotonic() + timeout
            while self._reap(os.WNOHANG):
                if time.monotonic() > deadline:
                    os.kill(self.proc.pid, signal.SIGKILL)
                    self._reap(0)
                    break
                time.sleep(0.02)
        return self.cpu_seconds

    @property
    def exit_code(self) -> Optional[int]:
        return self.proc.returncode


def _open_files(pids) -> set:
    """Paths the given processes have open, from /proc/PID/fd."""
    out = set()
    for pid in pids:
        fd_dir = "/proc/%d/fd" % pid
        try:
            names = os.listdir(fd_dir)
        except OSError:
            continue
        for name in names:
            try:
                out.add(os.readlink(os.path.join(fd_dir, name)))
            except OSError:
                pass
    return out


def _threads(pid: int) -> List[int]:
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except OSError:
        return []


def _dir_bytes(path: Path, prefix: str = "") -> int:
    total = 0
    try:
        for entry in os.scandir(path):
            if entry.is_file(follow_symlinks=False) and entry.name.startswith(prefix):
                total += entry.stat().st_size
    except OSError:
        pass
    return total


class Collector:
    """Base: no process at all. ``tracing`` says whether events are on for this run."""

    name = "?"
    tracing = True
    description = ""

    def available(self) -> Optional[str]:
        """None if it can run here, else one line saying why not."""
        return None

    def start(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def stop(self) -> CollectorReport:
        return CollectorReport()


class Off(Collector):
    name = "off"
    tracing = False
    description = "events disabled and tracing off in the instance"


class Native(Collector):
    name = "native"
    description = "events on, tracing on, no reader: the ring buffer overwrites (the seed's native)"


class _Processes(Collector):
    """Collectors that are one or more child processes writing files into outdir."""

    stop_signal = signal.SIGINT
    stop_timeout = 10.0
    raw_output = False       # whether outdir/cpuN are raw ring-buffer pages (decodable)
    tids: Optional[List[int]] = None

    def start(self, ctx: RunContext) -> None:
        super().start(ctx)
        self.children: List[Child] = []
        self._files: List = []
        for argv, out in self.commands(ctx):
            fh = open(out, "wb") if out is not None else None
            if fh is not None:
                self._files.append(fh)
            self.children.append(Child(argv, stdout=fh))
        self._wait_ready(ctx)

    start_timeout = 15.0

    def ready_paths(self, ctx: RunContext) -> List[str]:
        """Files the collector holds open once it is reading (all per-CPU pipes by default)."""
        return [ctx.tracefs.trace_pipe_raw(cpu) for cpu in ctx.cpus]

    def _wait_ready(self, ctx: RunContext) -> None:
        """Wait until the children have every input open, so the workload never starts
        before the collector does (an interpreter start-up is not what we measure)."""
        want = {os.path.realpath(p) for p in self.ready_paths(ctx)}
        deadline = time.monotonic() + self.start_timeout
        while True:
            dead = [c for c in self.children if not c.alive()]
            if dead:
                self.stop()
                raise VmtraceError("collector %s exited at start: %s (exit %s)"
                                   % (self.name, " ".join(dead[0].argv), dead[0].exit_code))
            if want <= _open_files(c.proc.pid for c in self.children):
                self.tids = sorted(t for c in self.children for t in _threads(c.proc.pid))
                return
            if time.monotonic() > deadline:
                self.stop()
                raise VmtraceError("collector %s did not open %s within %g s"
                                   % (self.name, ", ".join(sorted(want)), self.start_timeout))
            time.sleep(0.02)

    def commands(self, ctx: RunContext):
        raise NotImplementedError

    def stop(self) -> CollectorReport:
        cpu = sum(c.stop(self.stop_signal, self.stop_timeout) for c in self.children)
        for fh in self._files:
            fh.close()
        report = CollectorReport(cpu_seconds=cpu, bytes=_dir_bytes(self.ctx.outdir), tids=self.tids,
                                 raw_output=self.raw_output)
        self.finish(report)
        return report

    def finish(self, report: CollectorReport) -> None:
        """Hook for collectors that leave their own statistics behind."""


class Vmtrace(_Processes):
    name = "vmtrace"
    description = "vmtrace agent with its defaults (splice, buffer_percent wake-ups, automatic pump placement)"
    stop_timeout = 20.0
    raw_output = True

    def available(self) -> Optional[str]:
        if importlib.util.find_spec("vmtrace.commands.agent") is None:
            return "the vmtrace agent (vmtrace.commands.agent) is not available yet"
        return None

    def commands(self, ctx: RunContext):
        # The agent as a guest runs it (stdlib only, no click), with its defaults: what
        # users get is what is measured, placement included.
        argv = [sys.executable, "-m", "vmtrace.agent", "--instance", str(ctx.tracefs.instance),
                "--output-dir", str(ctx.outdir), "--start"]
        yield argv, None

    def finish(self, report: CollectorReport) -> None:
        report.bytes = _dir_bytes(self.ctx.outdir, "cpu")
        meta = self.ctx.outdir / "metadata" / "meta.json"
        try:
            stats = json.loads(meta.read_text()).get("stats", {})
        except (OSError, ValueError, AttributeError):
            report.note = "agent wrote no metadata/meta.json"
            return
        if isinstance(stats, dict):
            report.lost_reported = sum(int(s.get("lost_events", 0) or 0) for s in stats.values() if isinstance(s, dict))
        code = self.children[0].exit_code if self.children else None
        if code not in (0, None, -signal.SIGINT, 130):
            report.note = "agent exit %s" % code


class Seedlike(_Processes):
    name = "seedlike"
    description = "reference C agent: a splice thread bound to each CPU, 100 ms polling"
    stop_timeout = 5.0
    raw_output = True

    def commands(self, ctx: RunContext):
        exe = ctx.peers.get("seedlike-agent")
        if exe is None:
            raise VmtraceError("seedlike-agent was not compiled")
        yield [str(exe), ctx.tracefs.path, str(ctx.outdir), str(max(ctx.cpus) + 1)], None


# A naive collector: read() a CPU's trace_pipe_raw into a user buffer and write() it out.
# Plain `cat` is not enough: on a modern kernel read() returns 0 (EOF) whenever no page
# can be handed out yet, and cat stops there. So, like the seed's read/write agent, we
# retry after 100 ms. Kept as a string run with `python -S -c` so that starting it costs
# no imports; SIGTERM ends it.
_NAIVE_COPY = """
import os, sys, time
src = os.open(sys.argv[1], os.O_RDONLY)
dst = os.open(sys.argv[2], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
while True:
    data = os.read(src, 65536)
    if not data:
        time.sleep(0.1)
        continue
    while data:
        data = data[os.write(dst, data):]
"""


class Copy(_Processes):
    name = "copy"
    description = "naive read/write copy of each per_cpu/cpuN/trace_pipe_raw (one process per CPU)"
    stop_signal = signal.SIGTERM

    def commands(self, ctx: RunContext):
        for cpu in ctx.cpus:
            yield [sys.executable, "-S", "-c", _NAIVE_COPY, ctx.tracefs.trace_pipe_raw(cpu),
                   str(ctx.outdir / ("cpu%d" % cpu))], None


class Text(_Processes):
    name = "text"
    description = "`cat trace_pipe > file`: the kernel formats every event as text"

    def ready_paths(self, ctx: RunContext) -> List[str]:
        return [ctx.tracefs.file("trace_pipe")]

    def commands(self, ctx: RunContext):
        yield ["cat", ctx.tracefs.file("trace_pipe")], ctx.outdir / "trace.txt"


ALL = {c.name: c for c in (Off, Native, Vmtrace, Seedlike, Copy, Text)}


def make(names: Sequence[str]) -> List[Collector]:
    unknown = [n for n in names if n not in ALL]
    if unknown:
        raise VmtraceError("unknown collector %s (have: %s)" % (", ".join(unknown), ", ".join(NAMES)))
    return [ALL[n]() for n in names]
