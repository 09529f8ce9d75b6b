"""A recording: many guests (and optionally the host) at once, into one session directory.

Control and data are kept apart on purpose. Data (every guest x CPU stream) goes
through one :class:`~vmtrace.host.drain.Drainer`, whose threads never wait on a guest's
control port; this module runs the control plane in the calling thread: negotiation,
start/stop orders, a time probe every half second (for clock sync), agent statistics,
and noticing guests that vanish. At the end each guest's spool becomes a trace.dat.

The control plane is one loop over all guests, never a wait on one of them. Each
guest's negotiation and its end (stop, saved_cmdlines, bye) are generators that the
loop steps (:mod:`~vmtrace.host.conversation`), so a guest that is slow, silent or
hostile delays nobody else's probes, the duration or Ctrl-C; each guest's control port
gets a bounded share per turn (:mod:`vmtrace.host.control`). One guest's failure (bad
replies, a flood, metadata that cannot be used, a trace.dat that cannot be written)
ends that guest's recording with a line in its ``problems``; the other guests and
session.json are written regardless (:mod:`~vmtrace.host.outputs`).

Output, the *session directory* (docs/host.md)::

    OUTDIR/session.json          guests, clocks, stats, time probes, order timings
    OUTDIR/NAME.dat              one trace.dat per guest (host.dat for --host-events)
    OUTDIR/NAME.raw/             the spool, raw directory layout (kept with keep_raw,
                                 or when the .dat could not be written)

Nothing a guest sends becomes a path: file names come from the guest's *name on the
host* and from validated metadata names only. Nothing a guest says about itself
replaces what the host knows (its name, clock, CPU count): that goes under ``guest``.
"""
from __future__ import annotations

import math
import os
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

from vmtrace.errors import VmtraceError
from vmtrace.host import conversation
from vmtrace.host.drain import Drainer, Stream
from vmtrace.host.layout import GuestLayout, prepare
from vmtrace.host.outputs import write_dat, write_summary
from vmtrace.host.state import HOST_NAME, Guest, Options, Task

__all__ = ["Options", "Recording", "record"]

TICK_S = 0.05              # the loop's longest sleep: probe timing and Ctrl-C latency
# Descriptors per guest CPU: data port, spool file, spill pipe (2); per guest: control,
# listener, spool directory work. The rest is Python, the drainer and the host agent.
FDS_PER_CPU = 4
FDS_PER_GUEST = 4
FDS_BASE = 64


def _default_outdir() -> str:
    return os.path.abspath("vmtrace-%s" % time.strftime("%Y%m%d-%H%M%S"))


def _make_outdir(path: str) -> str:
    path = os.path.abspath(path)
    if os.path.islink(path):
        raise VmtraceError("output directory %s is a symlink; refusing" % path)
    os.makedirs(path, mode=0o750, exist_ok=True)
    if any(e.endswith((".dat", ".raw")) or e == "session.json" for e in os.listdir(path)):
        raise VmtraceError("output directory %s already holds a recording; choose another -o" % path)
    return path


def _ensure_fds(needed: int) -> None:
    """Raise the descriptor limit to what the recording needs, or say why it cannot."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or needed <= soft:
        return
    if hard != resource.RLIM_INFINITY and needed > hard:
        raise VmtraceError("this recording needs about %d file descriptors (%d per guest CPU); the limit is %d "
                           "(ulimit -n): record fewer guests at once" % (needed, FDS_PER_CPU, hard))
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


class Recording:
    """One recording. ``run()`` returns the summary (also written as session.json)."""

    def __init__(self, guests: Sequence[str], opts: Options,
                 progress: Optional[Callable[["Recording"], None]] = None,
                 stop: Optional[threading.Event] = None):
        if not guests and not opts.host_events:
            raise VmtraceError("nothing to record: name at least one guest (or --host-events)")
        self.opts = opts
        self.progress = progress
        self.stop_event = stop or threading.Event()
        self.outdir = _make_outdir(opts.outdir or _default_outdir())
        self.guests: Dict[str, Guest] = {}
        for g in guests:
            lay = GuestLayout.open(g, opts.base)
            if lay.name in self.guests or (opts.host_events and lay.name == HOST_NAME):
                raise VmtraceError("guest name %s given twice" % lay.name)
            self.guests[lay.name] = Guest(lay.name, lay, os.path.join(self.outdir, lay.name + ".raw"))
        host_cpus = (os.cpu_count() or 1) if opts.host_events else 0
        _ensure_fds(FDS_BASE + sum(FDS_PER_CPU * g.layout.cpus + FDS_PER_GUEST for g in self.guests.values())
                    + FDS_PER_CPU * host_cpus)
        self.drainer = Drainer(on_error=self._on_write_error)
        self.errors: List[str] = []
        self.stop_reason = ""
        self._turn = 0

    @property
    def started_ns(self) -> int:
        """When the first guest's start order went out (CLOCK_MONOTONIC; 0: none yet)."""
        return min((g.start_ns for g in self.guests.values() if g.start_ns), default=0)

    @property
    def stopped_ns(self) -> int:
        """When the last guest's stop was acknowledged or given up on (0: none yet)."""
        return max((g.stop_ns for g in self.guests.values()), default=0)

    # -- the whole thing ---------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        try:
            if self.opts.host_events:
                self._spawn_host_agent()
                self._start_vcpu_sync()
            for g in self.guests.values():
                self._open(g)
            self.drainer.start()
            for g in self.guests.values():
                g.task = self._setup(g)
            self._drive(stopping=False)
            for g in self.guests.values():
                if g.state == "running":
                    g.task = conversation.finish(g, self.opts)
            self._drive(stopping=True)
        finally:
            self._stop_vcpu_sync()
            self.drainer.stop()
            for g in self.guests.values():
                self._close(g)
        if not any(g.started for g in self.guests.values()):
            raise VmtraceError(self.errors[0] if self.errors else "interrupted before any guest started recording")
        for g in self.guests.values():
            error = write_dat(g, self.outdir, self.opts)
            if error:
                self.errors.append(error)
        return write_summary(self.outdir, self.guests.values(), self.started_ns, self.stopped_ns,
                             self.stop_reason, self.errors)

    # -- the loop ----------------------------------------------------------------------------
    def _drive(self, stopping: bool) -> None:
        """Turn the loop until the recording should stop (or, ``stopping``, until every
        guest's end is done). Every guest gets a step and a bounded share of I/O per turn."""
        end: Optional[float] = None
        last_progress = 0.0
        while True:
            now = time.monotonic()
            busy = [g for g in self.guests.values() if g.task is not None]
            if stopping:
                if not busy:
                    return
            else:
                running = [g for g in self.guests.values() if g.state == "running"]
                why = None
                if self.stop_event.is_set():
                    why = "interrupted"
                elif self.drainer.errors:
                    why = "write error"
                else:
                    if not busy and end is None:
                        end = now + self.opts.duration if self.opts.duration else math.inf
                    if end is not None and now >= end:
                        why = "duration"
                    elif not busy and not running:
                        why = "all guests ended"
                if why:
                    self.stop_reason = why
                    for g in busy:
                        self._abandon(g, "%s before the guest started recording" % why)
                    return
            for g in busy:
                self._step(g)
            if not stopping:
                for g in self.guests.values():
                    conversation.schedule(g, now)
            self._io(stopping)
            if not stopping:
                for g in self.guests.values():
                    if g.state == "running":
                        self._check_alive(g)
                if self.progress and time.monotonic() - last_progress >= 0.25:
                    last_progress = time.monotonic()
                    self.progress(self)

    def _step(self, g: Guest) -> None:
        assert g.task is not None
        try:
            next(g.task)
        except StopIteration:
            g.task = None
        except VmtraceError as exc:
            g.task = None
            self._fail(g, str(exc))

    def _io(self, stopping: bool) -> None:
        """Wait (at most TICK_S) for any guest's control port, then give each ready one
        its share, starting with a different guest each turn."""
        links: Dict[int, Guest] = {}
        for g in self.guests.values():
            link = g.link
            if link is None or link.rfd is None or link.eof:
                continue
            if g.task is None and g.state != "running":
                continue
            if link.queued:
                link.flush(0)
            links[link.rfd] = g
        if not links:
            time.sleep(TICK_S)
            return
        poller = select.poll()
        for fd, g in links.items():
            poller.register(fd, select.POLLIN | (select.POLLOUT if g.link.queued else 0))
        try:
            ready = poller.poll(TICK_S * 1000.0)
        except OSError:
            ready = []
        self._turn += 1
        if ready:
            k = self._turn % len(ready)
            ready = ready[k:] + ready[:k]
        for fd, ev in ready:
            g = links[fd]
            link = g.link
            if link is None:
                continue
            if ev & select.POLLOUT:
                link.flush(0)
            if ev & ~select.POLLOUT:
                link.pump(0)
                if g.state == "running" and not stopping:
                    conversation.collect(g)
        for g in links.values():
            if g.link is not None:
                why = g.link.misbehaviour()
                if why:
                    self._cut_off(g, why)

    # -- ending one guest -----------------------------------------------------------------------
    def _fail(self, g: Guest, why: str) -> None:
        """A guest's task failed: before its start that is an error of the session."""
        g.problem(why[len(g.name) + 2:] if why.startswith(g.name + ": ") else why)
        if not g.started:
            g.state = "failed"
            self.errors.append(why)
        self._detach(g)

    @staticmethod
    def _end_task(g: Guest) -> None:
        """Drop what the guest's task was waiting for (its generator is closed)."""
        if g.task is not None:
            g.task.close()
            g.task = None

    def _cut_off(self, g: Guest, why: str) -> None:
        """A guest went over a bound: end its recording, keep what it recorded."""
        self._end_task(g)
        if not g.started:
            self._fail(g, "%s: %s; this guest was not recorded" % (g.name, why))
            return
        g.problem("%s; this guest's recording was ended" % why)
        g.state = "cut off"
        self._detach(g)

    def _abandon(self, g: Guest, why: str) -> None:
        self._end_task(g)
        if not g.started:
            g.state = "failed"
            g.problem(why)
            self._detach(g)

    def _detach(self, g: Guest) -> None:
        """Stop listening to a guest: its control port is closed, its data drained to the end."""
        if g.link is not None:
            self._note_link(g)
            g.link.close()
        for s in g.streams.values():
            self.drainer.close_stream(s)

    def _note_link(self, g: Guest) -> None:
        """Put what was wrong with a guest's replies into its problems, once."""
        link = g.link
        if link is None or g.link_noted:
            return
        g.link_noted = True
        desc = link.describe_errors()
        if desc:
            g.problem("control port: %s" % desc)
        if g.bad_stats:
            g.problem("%d stats replies of the wrong shape ignored" % g.bad_stats)
        if g.bad_probes:
            g.problem("%d time probe replies without a usable guest_ns ignored" % g.bad_probes)

    # -- setup -------------------------------------------------------------------------------
    def _spawn_host_agent(self) -> None:
        """Record this machine with the real agent (same pumps as in guests) over FIFOs."""
        from vmtrace.tracefs import Tracefs

        cpus = Tracefs().cpus()
        tmp = tempfile.mkdtemp(prefix="vmtrace-host-")
        lay = prepare(HOST_NAME, max(cpus) + 1, tmp, "fifo", str(os.getegid()))
        g = Guest(HOST_NAME, lay, os.path.join(self.outdir, HOST_NAME + ".raw"), tmp=tmp)
        g.process = subprocess.Popen(
            [sys.executable, "-m", "vmtrace.agent", "--ports", lay.path, "--instance", "vmtrace-record-%d" % os.getpid()]
            + ([] if self.opts.kallsyms else ["--no-kallsyms"]),
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.guests[HOST_NAME] = g

    def _start_vcpu_sync(self) -> None:
        """With host events, record what puts TCG guests on the host's clock to the
        microsecond (host/vcpusync.py); a guest it cannot serve keeps the probe fit,
        and session.json says why."""
        from vmtrace.host import vcpusync

        self.vcpu_rec = None
        self._sync_plans: Dict[str, Dict[str, Any]] = {}
        tids, kvm_tids = [], []
        for g in self.guests.values():
            if g.process is not None:
                continue
            plan, why = vcpusync.plan(g.layout.path, g.layout.cpus)
            if plan is None:
                g.sync = {"method": "ptp", "why": why}
                continue
            self._sync_plans[g.name] = plan
            g.sync = dict(plan)
            g.sync.pop("kvm_dir", None)
            threads = list((plan.get("vcpu_threads") or {}).values())
            tids += threads
            if plan["method"] == "kvm":
                kvm_tids += threads
        if not self._sync_plans:
            return
        try:
            self.vcpu_rec = vcpusync.VcpuRecord(self.outdir, tids, kvm_tids)
            self.vcpu_rec.start()
        except (OSError, VmtraceError) as exc:
            self.vcpu_rec = None
            for g in self.guests.values():
                if g.name in self._sync_plans:
                    g.sync = {"method": "ptp", "why": "host vCPU record not started: %s" % exc}
            self._sync_plans = {}

    def _stop_vcpu_sync(self) -> None:
        from vmtrace.host import vcpusync

        rec = getattr(self, "vcpu_rec", None)
        if rec is None:
            return
        self.vcpu_rec = None
        doc = rec.stop()
        for g in self.guests.values():
            plan = self._sync_plans.get(g.name)
            if plan is None:
                continue
            if plan["method"] == "kvm":
                try:
                    g.sync = vcpusync.kvm_section(plan, doc, rec.path)
                except VmtraceError as exc:
                    g.sync = {"method": "ptp", "why": "KVM TSC offsets not read: %s" % exc}
            else:
                g.sync.update(doc)

    def _open(self, g: Guest) -> None:
        os.makedirs(g.raw, mode=0o750)
        lay = g.layout
        for cpu in range(lay.cpus):
            g.outs[cpu] = os.open(os.path.join(g.raw, "cpu%d" % cpu),
                                  os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
        g.ports = lay.open_ports()
        if not g.ports.waiting:  # FIFOs: all there now; sockets are accepted in _setup
            self._take_ports(g)
        if self.opts.max_size:
            self.drainer.group(g.name, self.opts.max_size)

    def _take_ports(self, g: Guest) -> None:
        """Take the ports that have connected: the control link, and data into the drainer."""
        assert g.ports is not None
        link, data = g.ports.accept()
        if link is not None:
            g.link = link
        for cpu, src in data.items():
            g.streams[cpu] = self.drainer.add((g.name, cpu), src, g.outs[cpu], group=g.name)
        if not g.ports.waiting:
            g.ports = None

    def _accept(self, g: Guest, deadline: float) -> Task:
        """Wait for QEMU (or an agent) to connect the control and every data port (sockets)."""
        while g.ports is not None:
            if time.monotonic() >= deadline:
                raise VmtraceError("%s: nothing connected to %s within %.0f s (is QEMU running with "
                                   "vmtrace prepare's options?)" % (g.name, g.layout.path, self.opts.connect_timeout))
            self._take_ports(g)
            if g.ports is not None:
                yield

    def _setup(self, g: Guest) -> Task:
        """A guest from its ports' connection to its start order, one step per loop turn."""
        if g.ports is not None:
            yield from self._accept(g, time.monotonic() + self.opts.connect_timeout)
        yield from conversation.setup(g, self.opts)

    # -- while recording --------------------------------------------------------------------
    def _check_alive(self, g: Guest) -> None:
        gone = None
        if g.link is not None and g.link.eof:
            gone = "control channel closed"
        elif g.streams and all(s.eof for s in g.streams.values()):
            gone = "all data ports closed"
        elif g.process is not None and g.process.poll() is not None:
            gone = "host agent exited (%s)" % g.process.returncode
        if gone:
            g.state = "gone"
            g.problem("guest went away during recording: %s" % gone)
            for s in g.streams.values():
                self.drainer.close_stream(s)

    def _on_write_error(self, s: Stream, msg: str) -> None:
        g = self.guests.get(s.label[0]) if isinstance(s.label, tuple) else None
        line = "%s cpu%s: writing stopped after %d bytes: %s" % (
            s.label[0], s.label[1], s.written, s.write_error) if g else msg
        self.errors.append(line)
        if g is not None:
            g.write_failed = True
            g.problem(line)

    # -- closing ------------------------------------------------------------------------------
    def _close(self, g: Guest) -> None:
        self._end_task(g)
        if g.ports is not None:
            g.ports.close()
            g.ports = None
        if g.link is not None:
            self._note_link(g)
            g.link.close()
        if g.process is not None:
            try:
                g.process.wait(15)
            except subprocess.TimeoutExpired:
                g.process.send_signal(signal.SIGINT)
                try:
                    g.process.wait(10)
                except subprocess.TimeoutExpired:
                    g.process.kill()
                    g.process.wait()
            err = (g.process.stderr.read() or b"").decode("utf-8", "replace") if g.process.stderr else ""
            if g.process.returncode not in (0, None):
                g.problem("host agent: %s" % (err.strip().splitlines() or ["exit %s" % g.process.returncode])[-1])
        for fd in g.outs.values():
            try:
                os.close(fd)
            except OSError:
                pass
        g.outs = {}
        if g.tmp:
            shutil.rmtree(g.tmp, ignore_errors=True)


def record(guests: Sequence[str], outdir: Optional[str] = None, duration: Optional[float] = None,
           events: Optional[Sequence[str]] = None, progress: Optional[Callable[[Recording], None]] = None,
           stop: Optional[threading.Event] = None, **options: Any) -> Dict[str, Any]:
    """Record ``guests`` (names under the default base, or directories) into ``outdir``.

    The Python entry point behind ``vmtrace record``; returns the session summary (the
    content of session.json). ``options`` are the fields of :class:`Options`.
    """
    opts = Options(outdir=outdir, duration=duration, events=events, **options)
    return Recording(guests, opts, progress=progress, stop=stop).run()
