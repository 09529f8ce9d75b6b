"""A recording: many guests (and optionally the host) at once, into one session directory.

Control and data are kept apart on purpose. Data (every guest x CPU stream) goes
through one :class:`~vmtrace.host.drain.Drainer`, whose threads never wait on a guest's
control port; this module runs the control plane in the calling thread: negotiation,
start/stop orders, a time probe every half second (for clock sync), agent statistics,
and noticing guests that vanish. At the end each guest's spool becomes a trace.dat.

The control plane is one loop over all guests, never a wait on one of them. Each
guest's negotiation and its end (stop, saved_cmdlines, bye) are generators that the
loop steps, so a guest that is slow, silent or hostile delays nobody else's probes, the
duration or Ctrl-C; each guest's control port gets a bounded share per turn
(:mod:`vmtrace.host.control`). One guest's failure (bad replies, a flood, metadata that
cannot be used, a trace.dat that cannot be written) ends that guest's recording with a
line in its ``problems``; the other guests and session.json are written regardless.

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

import json
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
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Generator, List, Optional, Sequence

from vmtrace import protocol
from vmtrace.errors import VmtraceError
from vmtrace.host.control import AgentLink, Request
from vmtrace.host.drain import Drainer, Stream
from vmtrace.host.guestdata import (check_cpu_stats, check_hello, check_meta, check_probe, check_stats,
                                    clock_name, short, text)
from vmtrace.host.layout import GuestLayout, prepare
from vmtrace.host.metadata import check_metadata, finish_meta, formats_metadata
from vmtrace.host.transport import Ports

PROBE_PERIOD_S = 0.5
STATS_PERIOD_S = 1.0
HOST_NAME = "host"
# Ceilings for waiting on a guest's agent. They only matter on a sick machine: a
# healthy TCG guest answers each in about a second.
CONFIGURE_TIMEOUT_S = 120.0
METADATA_TIMEOUT_S = 120.0
ORDER_TIMEOUT_S = 30.0
TICK_S = 0.05              # the loop's longest sleep: probe timing and Ctrl-C latency
MAX_PENDING_PROBES = 64    # unanswered probes remembered per guest (32 s of them)
MAX_PROBES = 1 << 16       # probes kept per guest (9 h at 2/s, ~15 MB); older ones are thinned
MAX_PROBLEMS = 32          # problem lines per guest; more are counted
MAX_PROBLEM_LEN = 400      # one problem line
# The metadata asked for again after the stop has no kallsyms: formats (a few MB for
# every event of a kernel) and saved_cmdlines (<1 MB). Capped apart, so the end of a
# recording never holds two full --max-metadata copies of one guest.
REFRESH_CAP = 8 << 20
# Descriptors per guest CPU: data port, spool file, spill pipe (2); per guest: control,
# listener, spool directory work. The rest is Python, the drainer and the host agent.
FDS_PER_CPU = 4
FDS_PER_GUEST = 4
FDS_BASE = 64

Task = Generator[None, None, None]


@dataclass
class Options:
    """What ``vmtrace record`` was asked to do (see the command's help)."""

    outdir: Optional[str] = None
    duration: Optional[float] = None
    events: Optional[Sequence[str]] = None
    clock: Optional[str] = None
    buffer_kb: Optional[int] = None
    host_events: Optional[Sequence[str]] = None
    formats_dir: Optional[str] = None
    file_version: int = 7
    compression: Optional[str] = "zstd"
    max_size: Optional[int] = None
    max_metadata: int = 64 << 20
    keep_raw: bool = False
    base: Optional[str] = None
    hello_timeout: float = 2.0
    connect_timeout: float = 30.0
    kallsyms: bool = True


@dataclass
class Guest:
    name: str
    layout: GuestLayout
    raw: str
    link: Optional[AgentLink] = None
    framed: bool = False
    info: Dict[str, Any] = field(default_factory=dict)         # hello, as guest data
    agent_info: Dict[str, Any] = field(default_factory=dict)   # stats' "agent", as guest data
    cpus: List[int] = field(default_factory=list)
    streams: Dict[int, Stream] = field(default_factory=dict)
    outs: Dict[int, int] = field(default_factory=dict)
    ports: Optional[Ports] = None  # while some port may still connect
    metadata: Dict[str, bytes] = field(default_factory=dict)
    meta: Dict[str, Any] = field(default_factory=dict)         # meta.json, checked
    clock: Optional[str] = None
    probes: List[List[int]] = field(default_factory=list)
    orders: List[List[Any]] = field(default_factory=list)
    agent_stats: Dict[str, Any] = field(default_factory=dict)  # per CPU, checked
    state: str = "setup"  # setup, running, stopped; or gone, cut off, failed
    started: bool = False
    task: Optional[Task] = None
    problems: List[str] = field(default_factory=list)
    more_problems: int = 0
    file: Optional[str] = None
    pending_probes: Dict[Any, Any] = field(default_factory=dict)
    pending_stats: Any = None
    next_probe: float = 0.0
    next_stats: float = 0.0
    seq: int = 0
    order_seq: int = 0
    bad_probes: int = 0
    bad_stats: int = 0
    arrived_ns: int = 0   # when the last reply waited for by a task arrived
    link_noted: bool = False
    write_failed: bool = False
    process: Optional[subprocess.Popen] = None  # the host agent, for --host-events
    tmp: Optional[str] = None

    def problem(self, line: str) -> None:
        """Note a problem: one line, bounded in length and number (guest text may be in it)."""
        if len(self.problems) >= MAX_PROBLEMS:
            self.more_problems += 1
            return
        line = "".join(c if c.isprintable() else "?" for c in line)
        self.problems.append(line if len(line) <= MAX_PROBLEM_LEN else line[:MAX_PROBLEM_LEN] + "...")


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
        self.started_ns = 0
        self.stopped_ns = 0
        self.errors: List[str] = []
        self.stop_reason = ""
        self._turn = 0

    # -- the whole thing ---------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        try:
            if self.opts.host_events:
                self._spawn_host_agent()
            for g in self.guests.values():
                self._open(g)
            self.drainer.start()
            for g in self.guests.values():
                g.task = self._setup(g)
            self._drive(stopping=False)
            for g in self.guests.values():
                if g.state == "running":
                    g.task = self._finish(g)
            self._drive(stopping=True)
        finally:
            self.drainer.stop()
            for g in self.guests.values():
                self._close(g)
        if not any(g.started for g in self.guests.values()):
            raise VmtraceError(self.errors[0] if self.errors else "interrupted before any guest started recording")
        for g in self.guests.values():
            self._write_dat(g)
        return self._summary()

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
                self._schedule(now)
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

    def _schedule(self, now: float) -> None:
        """Time probes and stats requests for the guests that are recording."""
        for g in self.guests.values():
            if g.state != "running" or not g.framed or g.link is None:
                continue
            if now >= g.next_probe:
                g.seq += 1
                t = time.monotonic_ns()
                rid = g.link.send("time_probe", seq=g.seq)
                if rid is not None:
                    g.pending_probes[rid] = (t, g.seq)
                    if len(g.pending_probes) > MAX_PENDING_PROBES:
                        old = next(iter(g.pending_probes))
                        del g.pending_probes[old]
                        g.link.forget(old)
                g.next_probe = now + PROBE_PERIOD_S
            if now >= g.next_stats:
                g.link.forget(g.pending_stats)
                g.pending_stats = g.link.send("stats")
                g.next_stats = now + STATS_PERIOD_S

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
                    self._collect(g)
        for g in links.values():
            if g.link is not None:
                why = g.link.misbehaviour()
                if why:
                    self._cut_off(g, why)

    def _ask(self, g: Guest, name: str, timeout: float, every: Optional[float] = None, blob_cap: int = 0,
             **fields: Any) -> Generator[None, None, Optional[protocol.Message]]:
        """A request from inside a guest's task: yields to the loop until answered."""
        assert g.link is not None
        req = Request(g.link, name, timeout, every=every, blob_cap=blob_cap, **fields)
        while not req.poll():
            yield
        if req.malformed:
            raise VmtraceError("%s: a malformed frame came where the %s reply was awaited: %s"
                               % (g.name, name, g.link.last_error))
        g.arrived_ns = req.arrived_ns or time.monotonic_ns()
        return req.reply

    def _plain_order(self, g: Guest, start: bool) -> Generator[None, None, bool]:
        """A seed order, written without blocking the loop; False if not taken in 2 s."""
        assert g.link is not None
        if not g.link.queue_order(start):
            return False
        deadline = time.monotonic() + 2.0
        while g.link.queued and not g.link.eof and time.monotonic() < deadline:
            yield
        return not g.link.queued and not g.link.eof

    # -- ending one guest -----------------------------------------------------------------------
    def _why_silent(self, g: Guest) -> str:
        desc = g.link.describe_errors() if g.link is not None else ""
        return " (%s)" % desc if desc else ""

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
        """A guest from its first byte to its start order, one step per loop turn."""
        if g.ports is not None:
            yield from self._accept(g, time.monotonic() + self.opts.connect_timeout)
        # Without --formats a silent agent is an error anyway, so give a slow-starting
        # guest (Python under TCG takes seconds) the whole connect timeout to answer.
        wait = self.opts.hello_timeout if self.opts.formats_dir else self.opts.connect_timeout
        timeout = wait + (10.0 if g.process else 0.0)
        hello = yield from self._ask(g, "hello", timeout, every=10.0, version=protocol.VERSION,
                                     host=os.uname().nodename)
        if hello is None or hello.name != "hello":
            self._plain_setup(g, timeout)
        else:
            yield from self._negotiate(g, hello)
        yield from self._start(g)

    def _negotiate(self, g: Guest, hello: protocol.Message) -> Task:
        link = g.link
        assert link is not None
        g.framed = True
        try:
            g.cpus, g.info = check_hello(hello.fields)
        except VmtraceError as exc:
            raise VmtraceError("%s: %s" % (g.name, exc)) from None
        missing = [c for c in g.cpus if c >= g.layout.cpus]
        if missing:
            g.problem("agent traces CPUs %s but only %d data ports were prepared" % (short(missing), g.layout.cpus))
        conf: Dict[str, Any] = {}
        events = self.opts.host_events if g.process else self.opts.events
        if events:
            conf["events"] = list(events)
        clock = "mono" if g.process else self.opts.clock
        if clock:
            conf["clock"] = clock
        if self.opts.buffer_kb:
            conf["buffer_size_kb"] = int(self.opts.buffer_kb)
        conf["buffer_percent"] = 50
        # Enabling tracepoints patches kernel text and waits for every other vCPU to
        # answer an IPI; in a TCG guest on a busy host that alone took over 10 s (and
        # with a host thread per vCPU it could wedge for good: docs/lab.md). These are
        # ceilings for a sick machine; a healthy guest answers in about a second.
        rep = yield from self._ask(g, "configure", CONFIGURE_TIMEOUT_S, every=5.0, **conf)
        if rep is None or rep.name != "ok":
            why = text(rep.get("message"), 200) if rep is not None else "no reply" + self._why_silent(g)
            raise VmtraceError("%s: agent refused the configuration: %s" % (g.name, why))
        cap = self.opts.max_metadata
        rep = yield from self._ask(g, "metadata", METADATA_TIMEOUT_S, every=15.0, blob_cap=cap,
                                   kallsyms=self.opts.kallsyms)
        if rep is None or rep.name != "metadata":
            raise VmtraceError("%s: agent sent no metadata%s" % (g.name, self._why_silent(g)))
        if rep.blob_dropped:
            raise VmtraceError("%s: metadata is %d bytes, over the %d-byte cap (--max-metadata)"
                               % (g.name, rep.blob_dropped, cap))
        try:
            files = protocol.unpack_files(rep)
        except protocol.ProtocolError as exc:
            raise VmtraceError("%s: metadata: %s" % (g.name, exc.what)) from None
        del rep
        g.metadata, g.meta = check_metadata(g.name, files, cap)
        g.clock = g.meta["clock"] or clock or clock_name(g.info.get("clock")) or "local"
        self._write_metadata(g)

    def _plain_setup(self, g: Guest, waited: float) -> None:
        """A seed-style agent: only ``1``/``0``; metadata must come from --formats."""
        if not self.opts.formats_dir:
            raise VmtraceError("%s: no hello reply from the agent in %.0f s%s: it is not running, not started "
                               "yet (--connect-timeout), or a seed-style agent, which needs --formats DIR (a "
                               "copy of the guest's tracefs events/ directory and header files)"
                               % (g.name, waited, self._why_silent(g)))
        g.framed = False
        g.cpus = list(range(g.layout.cpus))
        g.clock = self.opts.clock or "local"
        g.metadata = formats_metadata(self.opts.formats_dir, g.name, g.cpus, g.clock, self.opts.max_metadata)
        g.meta = check_meta(json.loads(g.metadata["meta.json"]), g.name)
        self._write_metadata(g)

    def _write_metadata(self, g: Guest) -> None:
        from vmtrace.format.rawdir import write_metadata

        write_metadata(g.raw, g.metadata)

    def _start(self, g: Guest) -> Task:
        assert g.link is not None
        t0 = time.monotonic_ns()
        if not self.started_ns:
            self.started_ns = t0
        g.started = True
        if g.framed:
            # seq: the agent writes `vmtrace-order kind=start seq=N`, checked like a probe
            g.order_seq += 1
            rep = yield from self._ask(g, "start", ORDER_TIMEOUT_S, seq=g.order_seq)
            ok = rep is not None and rep.name == "ok"
            g.orders.append(["start", t0, g.arrived_ns if ok else None, g.order_seq])
        else:
            ok = yield from self._plain_order(g, True)
            g.orders.append(["start", t0, time.monotonic_ns() if ok else None])
        if not ok:
            g.problem("no acknowledgement of the start order")
        g.state = "running"
        g.next_probe = time.monotonic()
        g.next_stats = time.monotonic() + STATS_PERIOD_S

    # -- while recording --------------------------------------------------------------------
    def _collect(self, g: Guest) -> None:
        """File the probe and stats replies that came, each checked on arrival."""
        link = g.link
        assert link is not None
        for rid in [r for r in g.pending_probes if r in link.replies]:
            t_recv = link.arrived_ns.get(rid, 0)
            rep = link.take(rid)
            sent, seq = g.pending_probes.pop(rid)
            gns = check_probe(rep.fields, seq) if rep is not None and rep.name == "time_probe" else None
            if gns is None or t_recv < sent:
                g.bad_probes += 1
                continue
            # seq pairs the probe with its `vmtrace-probe seq=N` marker (merge, check)
            g.probes.append([sent, gns, t_recv, seq])
            if len(g.probes) > MAX_PROBES:
                del g.probes[:MAX_PROBES // 2:2]  # thin the older half: the fit keeps its span
        if g.pending_stats is not None and g.pending_stats in link.replies:
            rep = link.take(g.pending_stats)
            g.pending_stats = None
            st = check_stats(rep.fields, g.layout.cpus) if rep is not None and rep.name == "stats" else None
            if st is None:
                g.bad_stats += 1
            else:
                g.agent_stats, g.agent_info = st["cpus"], st["agent"]

    def _take_stats(self, g: Guest, value: Any) -> None:
        """Per-CPU counters that came with stop or bye, checked."""
        st = check_cpu_stats(value, g.layout.cpus)
        if st is None:
            g.bad_stats += 1
        else:
            g.agent_stats = st

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

    # -- stopping -----------------------------------------------------------------------------
    def _finish(self, g: Guest) -> Task:
        """Stop, saved_cmdlines again, bye: one guest's end, beside the others'."""
        link = g.link
        assert link is not None
        for rid in list(g.pending_probes) + [g.pending_stats]:
            link.forget(rid)
        g.pending_probes.clear()
        g.pending_stats = None
        t0 = time.monotonic_ns()
        if g.framed:
            g.order_seq += 1
            seq = g.order_seq
            rep = yield from self._ask(g, "stop", ORDER_TIMEOUT_S, seq=seq)
            g.orders.append(["stop", t0, g.arrived_ns if rep is not None else None, seq])
            if rep is None:
                # A guest silent for the stop's whole ceiling will not answer saved_cmdlines
                # or bye either: asking would only add their ceilings to the end.
                g.problem("no acknowledgement of the stop order")
                self.stopped_ns = max(self.stopped_ns, time.monotonic_ns())
                g.state = "stopped"
                return
            if "stats" in rep.fields:
                self._take_stats(g, rep.fields["stats"])
        else:
            ok = yield from self._plain_order(g, False)
            g.orders.append(["stop", t0, None])
            if not ok:
                g.problem("could not send the stop order")
        self.stopped_ns = max(self.stopped_ns, time.monotonic_ns())
        yield from self._refresh_cmdlines(g)
        g.state = "stopped"
        # Over a transport whose agent stays (sockets), the guest runs on and so does
        # its agent; closing the control port tells it we left, and the next `vmtrace
        # record` finds it again. Without bye its tracefs settings stay as configured
        # until it exits.
        if g.layout.backend.agent_stays and g.process is None:
            return
        if g.framed and not link.eof and link.rfd is not None:
            t0 = time.monotonic_ns()
            rep = yield from self._ask(g, "bye", ORDER_TIMEOUT_S)
            g.orders.append(["bye", t0, g.arrived_ns if rep is not None else None])
            if rep is not None and "stats" in rep.fields:
                self._take_stats(g, rep.fields["stats"])

    def _refresh_cmdlines(self, g: Guest) -> Task:
        """Take the guest's saved_cmdlines again after the stop, as trace-cmd does.

        Tasks started during the recording are only in the list at the end; tasks that
        exited early may have been evicted from it, so the start's entries are kept for
        pids the end no longer names.
        """
        if not g.framed or g.link is None or g.link.eof:
            return
        cap = min(self.opts.max_metadata, REFRESH_CAP)
        rep = yield from self._ask(g, "metadata", METADATA_TIMEOUT_S / 2, every=15.0, blob_cap=cap, kallsyms=False)
        if rep is None or rep.name != "metadata" or rep.blob_dropped:
            g.problem("could not refresh saved_cmdlines after the stop")
            return
        try:
            files, _ = check_metadata(g.name, protocol.unpack_files(rep), cap)
        except VmtraceError as exc:
            g.problem("saved_cmdlines after the stop: %s" % exc)
            return
        end = files.get("saved_cmdlines")
        if end is not None:
            g.metadata["saved_cmdlines"] = merge_cmdlines(g.metadata.get("saved_cmdlines", b""), end)

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

    # -- results --------------------------------------------------------------------------------
    def _stream_stats(self, g: Guest) -> Dict[str, Dict[str, Any]]:
        return {str(c): s.stats() for c, s in g.streams.items()}

    def _write_dat(self, g: Guest) -> None:
        """This guest's trace.dat; whatever goes wrong stays this guest's problem.

        Every value the writer gets was checked on arrival; the broad catch is the
        isolation boundary all the same: a bug met by one guest's data must not cost
        the other guests their files.
        """
        from vmtrace.format.tracedat_write import write_tracedat

        if not g.started:
            return
        if not g.metadata:
            g.problem("no metadata: trace.dat not written")
            return
        ports = g.layout.cpus
        target = os.path.join(self.outdir, g.name + ".dat")
        try:
            g.metadata = finish_meta(g.metadata, g.name, g.meta, g.clock, ports, g.agent_stats,
                                     self._stream_stats(g))
            cpu_files = {}
            for cpu in (g.cpus or range(ports)):
                path = os.path.join(g.raw, "cpu%d" % cpu)
                if cpu < ports and os.path.exists(path):
                    cpu_files[cpu] = path
            self._write_metadata(g)
            write_tracedat(target, g.metadata, cpu_files, version=self.opts.file_version,
                           compression=self.opts.compression if self.opts.file_version == 7 else None,
                           options={"hostname": g.name, "kernel": g.meta.get("kernel") or "unknown",
                                    "clock": g.clock or "local", "cpucount": ports})
        except Exception as exc:  # noqa: BLE001 - see the docstring
            if isinstance(exc, OSError):
                why = exc.strerror or str(exc)
            elif isinstance(exc, VmtraceError):
                why = str(exc)
            else:
                why = "internal error %s: %s" % (type(exc).__name__, exc)
            g.problem("%s.dat not written (%s); the raw spool %s is kept (vmtrace report reads it)"
                      % (g.name, why, g.raw))
            self.errors.append("%s: %s.dat not written: %s" % (g.name, g.name, why))
            return
        g.file = os.path.basename(target)
        if not self.opts.keep_raw and not g.write_failed:
            shutil.rmtree(g.raw, ignore_errors=True)

    def _entry(self, g: Guest) -> Dict[str, Any]:
        link = g.link
        problems = list(g.problems)
        if g.more_problems:
            problems.append("... and %d more problems" % g.more_problems)
        entry: Dict[str, Any] = {
            "file": g.file,
            "clock": g.clock,
            "cpus": len(g.cpus) if g.cpus else g.layout.cpus,
            "protocol": "vmtrace" if g.framed else "plain",
            "state": g.state,
            "stats": {"host": self._stream_stats(g), "agent": g.agent_stats},
            "probes": g.probes,
            "orders": g.orders,
            "problems": problems,
            # what the guest said about itself: checked, never used in place of the above
            "guest": {"hello": g.info, "meta": g.meta.get("guest", {}), "agent": g.agent_info},
        }
        if link is not None:
            entry["control"] = {"received": link.received, "malformed": link.decoder.errors,
                                "unsolicited": link.unsolicited, "late": link.late, "not_sent": link.not_sent}
        if g.file is None:
            entry["raw"] = os.path.basename(g.raw)
        try:
            json.dumps(entry, allow_nan=False)
        except (TypeError, ValueError) as exc:  # a bug, not the guest: keep the others' entries
            entry = {"file": g.file, "clock": clock_name(g.clock), "cpus": g.layout.cpus,
                     "protocol": entry["protocol"], "state": g.state,
                     "stats": {"host": self._stream_stats(g), "agent": {}}, "probes": [], "orders": [],
                     "problems": problems + ["internal error: session entry not serialisable (%s)" % exc]}
        return entry

    def _summary(self) -> Dict[str, Any]:
        doc: Dict[str, Any] = {"layout": "vmtrace-session", "version": 1, "outdir": self.outdir,
                               "started_ns": self.started_ns, "stopped_ns": self.stopped_ns,
                               "stop_reason": self.stop_reason, "guests": {}, "errors": list(self.errors)}
        for g in self.guests.values():
            entry = self._entry(g)
            if g.name == HOST_NAME and g.process is not None:
                doc["host"] = dict(entry, clock="mono")
            else:
                doc["guests"][g.name] = entry
        tmp = os.path.join(self.outdir, "session.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1, allow_nan=False)
            os.replace(tmp, os.path.join(self.outdir, "session.json"))
        except OSError as exc:
            self.errors.append("session.json not written: %s" % exc.strerror)
            doc["errors"] = list(self.errors)
        return doc


def record(guests: Sequence[str], outdir: Optional[str] = None, duration: Optional[float] = None,
           events: Optional[Sequence[str]] = None, progress: Optional[Callable[[Recording], None]] = None,
           stop: Optional[threading.Event] = None, **options: Any) -> Dict[str, Any]:
    """Record ``guests`` (names under the default base, or directories) into ``outdir``.

    The Python entry point behind ``vmtrace record``; returns the session summary (the
    content of session.json). ``options`` are the fields of :class:`Options`.
    """
    opts = Options(outdir=outdir, duration=duration, events=events, **options)
    return Recording(guests, opts, progress=progress, stop=stop).run()


def merge_cmdlines(start: bytes, end: bytes) -> bytes:
    """saved_cmdlines from the end of a recording, plus start entries for other pids."""
    def pids(text: bytes) -> Dict[bytes, bytes]:
        out: Dict[bytes, bytes] = {}
        for line in text.splitlines():
            pid, _, comm = line.strip().partition(b" ")
            if pid.isdigit() and comm:
                out[pid] = line.strip()
        return out

    later = pids(end)
    kept = [line for pid, line in pids(start).items() if pid not in later]
    lines = kept + list(later.values())
    return b"".join(line + b"\n" for line in lines)
