"""A recording session: many guests (and optionally the host) at once, into one directory.

Control and data are kept apart on purpose. Data (every guest x CPU stream) goes
through one :class:`~vmtrace.host.drain.Drainer`, whose threads never wait on a guest's
control port; this module runs the control plane in the calling thread: negotiation,
start/stop orders, a time probe every half second (for clock sync), agent statistics,
and noticing guests that vanish. At the end each guest's spool becomes a trace.dat.

Output, the *session directory* (docs/host.md)::

    OUTDIR/session.json          guests, clocks, stats, time probes, order timings
    OUTDIR/NAME.dat              one trace.dat per guest (host.dat for --host-events)
    OUTDIR/NAME.raw/             the spool, raw directory layout (kept with keep_raw,
                                 or when the .dat could not be written)

Nothing a guest sends becomes a path: file names come from the guest's *name on the
host* and from validated metadata names only.
"""
from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

from vmtrace import protocol
from vmtrace.errors import VmtraceError
from vmtrace.host.control import AgentLink
from vmtrace.host.drain import Drainer, Stream
from vmtrace.host.layout import CPU, CTL, GuestLayout, bind_socket, open_dir_checked, prepare
from vmtrace.host.metadata import formats_metadata, finish_meta, check_metadata

PROBE_PERIOD_S = 0.5
STATS_PERIOD_S = 1.0
HOST_NAME = "host"
# Ceilings for waiting on a guest's agent. They only matter on a sick machine: a
# healthy TCG guest answers each in about a second.
CONFIGURE_TIMEOUT_S = 120.0
METADATA_TIMEOUT_S = 120.0
ORDER_TIMEOUT_S = 30.0


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
    hello: Dict[str, Any] = field(default_factory=dict)
    cpus: List[int] = field(default_factory=list)
    streams: Dict[int, Stream] = field(default_factory=dict)
    outs: Dict[int, int] = field(default_factory=dict)
    listeners: Dict[int, socket.socket] = field(default_factory=dict)
    metadata: Dict[str, bytes] = field(default_factory=dict)
    clock: Optional[str] = None
    probes: List[List[int]] = field(default_factory=list)
    orders: List[List[Any]] = field(default_factory=list)
    agent_stats: Dict[str, Any] = field(default_factory=dict)
    state: str = "setup"  # setup, running, gone, stopped
    problems: List[str] = field(default_factory=list)
    file: Optional[str] = None
    pending_probes: Dict[Any, int] = field(default_factory=dict)
    pending_stats: Any = None
    next_probe: float = 0.0
    next_stats: float = 0.0
    seq: int = 0
    order_seq: int = 0
    write_failed: bool = False
    process: Optional[subprocess.Popen] = None  # the host agent, for --host-events
    tmp: Optional[str] = None


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


class Session:
    """One recording. ``run()`` returns the summary (also written as session.json)."""

    def __init__(self, guests: Sequence[str], opts: Options,
                 progress: Optional[Callable[["Session"], None]] = None,
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
        self.drainer = Drainer(on_error=self._on_write_error)
        self.started_ns = 0
        self.stopped_ns = 0
        self.errors: List[str] = []
        self.stop_reason = ""

    # -- the whole thing ---------------------------------------------------------------------
    def run(self) -> Dict[str, Any]:
        try:
            if self.opts.host_events:
                self._spawn_host_agent()
            for g in self.guests.values():
                self._open(g)
            for g in self.guests.values():
                self._negotiate(g)
            self.drainer.start()
            self.started_ns = time.monotonic_ns()
            for g in self.guests.values():
                self._start(g)
            self._loop()
            self._stop_all()
        finally:
            self.drainer.stop()
            for g in self.guests.values():
                self._close(g)
        for g in self.guests.values():
            self._write_dat(g)
        return self._summary()

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
        if lay.transport == "fifo":
            g.link = AgentLink.fifo(g.name, lay.ctl)
            for cpu in range(lay.cpus):
                try:
                    src = os.open(lay.cpu(cpu) + ".out", os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
                except OSError as exc:
                    raise VmtraceError("%s: cannot open %s.out: %s" % (g.name, lay.cpu(cpu), exc.strerror)) from None
                g.streams[cpu] = self.drainer.add((g.name, cpu), src, g.outs[cpu], group=g.name)
        else:
            dfd = open_dir_checked(lay.path)
            try:
                ctl = bind_socket(dfd, CTL, lay.gid, lay.ctl)
                for cpu in range(lay.cpus):
                    g.listeners[cpu] = bind_socket(dfd, CPU % cpu, lay.gid, lay.cpu(cpu))
            finally:
                os.close(dfd)
            g.listeners[-1] = ctl
        if self.opts.max_size:
            self.drainer.group(g.name, self.opts.max_size)

    def _accept(self, g: Guest, deadline: float) -> None:
        """Sockets: wait for QEMU (or an agent) to connect the control and every data port."""
        while g.listeners:
            left = deadline - time.monotonic()
            if left <= 0:
                raise VmtraceError("%s: nothing connected to %s within %.0f s (is QEMU running with "
                                   "vmtrace prepare's options?)" % (g.name, g.layout.path, self.opts.connect_timeout))
            socks = {s.fileno(): (k, s) for k, s in g.listeners.items()}
            for fd in select.select(list(socks), [], [], min(left, 0.2))[0]:
                key, lsock = socks[fd]
                conn, _ = lsock.accept()
                lsock.close()
                del g.listeners[key]
                if key == -1:
                    g.link = AgentLink.from_socket(g.name, conn)
                else:
                    conn.setblocking(False)
                    g.streams[key] = self.drainer.add((g.name, key), conn.detach(), g.outs[key], group=g.name)

    def _negotiate(self, g: Guest) -> None:
        if g.listeners:
            self._accept(g, time.monotonic() + self.opts.connect_timeout)
        link = g.link
        assert link is not None
        # Without --formats a silent agent is an error anyway, so give a slow-starting
        # guest (Python under TCG takes seconds) the whole connect timeout to answer.
        wait = self.opts.hello_timeout if self.opts.formats_dir else self.opts.connect_timeout
        timeout = wait + (10.0 if g.process else 0.0)
        hello = link.call_idempotent("hello", timeout, every=10.0, version=protocol.VERSION,
                                     host=os.uname().nodename)
        if hello is None or hello.name != "hello":
            self._plain_setup(g, timeout)
            return
        g.framed = True
        g.hello = dict(hello.fields)
        cpus = g.hello.get("cpus")
        g.cpus = [c for c in cpus if isinstance(c, int) and not isinstance(c, bool)] if isinstance(cpus, list) else []
        missing = [c for c in g.cpus if c not in g.streams]
        if missing:
            g.problems.append("agent traces CPUs %s but only %d data ports were prepared" % (missing, g.layout.cpus))
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
        rep = link.call_idempotent("configure", CONFIGURE_TIMEOUT_S, **conf)
        if rep is None or rep.name != "ok":
            why = rep.get("message") if rep is not None else "no reply"
            raise VmtraceError("%s: agent refused the configuration: %s" % (g.name, str(why)[:200]))
        rep = link.call_idempotent("metadata", METADATA_TIMEOUT_S, every=15.0, kallsyms=self.opts.kallsyms)
        if rep is None or rep.name != "metadata":
            raise VmtraceError("%s: agent sent no metadata" % g.name)
        if len(rep.blob) > self.opts.max_metadata:
            raise VmtraceError("%s: metadata is %d bytes, over the %d-byte cap (--max-metadata)"
                               % (g.name, len(rep.blob), self.opts.max_metadata))
        g.metadata = check_metadata(g.name, protocol.unpack_files(rep), self.opts.max_metadata)
        meta = json.loads(g.metadata["meta.json"])
        g.clock = str(meta.get("clock") or clock or g.hello.get("clock") or "local")
        self._write_metadata(g)

    def _plain_setup(self, g: Guest, waited: float) -> None:
        """A seed-style agent: only ``1``/``0``; metadata must come from --formats."""
        if not self.opts.formats_dir:
            raise VmtraceError("%s: no hello reply from the agent in %.0f s: it is not running, not started "
                               "yet (--connect-timeout), or a seed-style agent, which needs --formats DIR (a "
                               "copy of the guest's tracefs events/ directory and header files)" % (g.name, waited))
        g.framed = False
        g.cpus = list(range(g.layout.cpus))
        g.clock = self.opts.clock or "local"
        g.metadata = formats_metadata(self.opts.formats_dir, g.name, g.cpus, g.clock, self.opts.max_metadata)
        self._write_metadata(g)

    def _write_metadata(self, g: Guest) -> None:
        from vmtrace.format.rawdir import write_metadata

        write_metadata(g.raw, g.metadata)

    def _start(self, g: Guest) -> None:
        assert g.link is not None
        t0 = time.monotonic_ns()
        if g.framed:
            # seq: the agent writes `vmtrace-order kind=start seq=N`, checked like a probe
            g.order_seq += 1
            rep = g.link.call("start", ORDER_TIMEOUT_S, seq=g.order_seq)
            ok = rep is not None and rep.name == "ok"
        else:
            ok = g.link.order(True)
        g.orders.append(["start", t0, time.monotonic_ns() if ok else None] + ([g.order_seq] if g.framed else []))
        if not ok:
            g.problems.append("no acknowledgement of the start order")
        g.state = "running"
        g.next_probe = time.monotonic()
        g.next_stats = time.monotonic() + STATS_PERIOD_S

    # -- while recording --------------------------------------------------------------------
    def _loop(self) -> None:
        end = time.monotonic() + self.opts.duration if self.opts.duration else None
        last_progress = 0.0
        while True:
            if self.stop_event.is_set():
                self.stop_reason = "interrupted"
                return
            if end is not None and time.monotonic() >= end:
                self.stop_reason = "duration"
                return
            running = [g for g in self.guests.values() if g.state == "running"]
            if not running:
                self.stop_reason = "all guests ended"
                return
            if self.drainer.errors and not self.stop_reason:
                self.stop_reason = "write error"
                return
            now = time.monotonic()
            for g in running:
                if g.framed and now >= g.next_probe:
                    g.seq += 1
                    t = time.monotonic_ns()
                    rid = g.link.send("time_probe", seq=g.seq)
                    if rid is not None:
                        g.pending_probes[rid] = (t, g.seq)
                        if len(g.pending_probes) > 64:
                            g.pending_probes.pop(next(iter(g.pending_probes)))
                    g.next_probe = now + PROBE_PERIOD_S
                if g.framed and now >= g.next_stats:
                    g.pending_stats = g.link.send("stats")
                    g.next_stats = now + STATS_PERIOD_S
            fds = {g.link.rfd: g for g in running if g.link and g.link.rfd is not None and not g.link.eof}
            try:
                ready = select.select(list(fds), [], [], 0.05)[0] if fds else []
            except (OSError, ValueError):
                ready = []
            if not fds:
                time.sleep(0.05)
            t_recv = time.monotonic_ns()
            for fd in ready:
                g = fds[fd]
                g.link.pump(0)
                self._collect(g, t_recv)
            for g in running:
                self._check_alive(g)
            if self.progress and time.monotonic() - last_progress >= 0.25:
                last_progress = time.monotonic()
                self.progress(self)

    def _collect(self, g: Guest, t_recv: int) -> None:
        link = g.link
        for rid in [r for r in g.pending_probes if r in link.replies]:
            rep = link.replies.pop(rid)
            sent, seq = g.pending_probes.pop(rid)
            gns = rep.get("guest_ns")
            if rep.name == "time_probe" and isinstance(gns, int) and not isinstance(gns, bool):
                # seq pairs the probe with its `vmtrace-probe seq=N` marker (merge, check)
                g.probes.append([sent, gns, t_recv, seq])
                if len(g.probes) > 1 << 20:
                    del g.probes[: len(g.probes) // 2]
        if g.pending_stats is not None and g.pending_stats in link.replies:
            rep = link.replies.pop(g.pending_stats)
            g.pending_stats = None
            if rep.name == "stats" and isinstance(rep.get("cpus"), dict):
                g.agent_stats = rep.fields

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
            g.problems.append("guest went away during recording: %s" % gone)
            for s in g.streams.values():
                self.drainer.close_stream(s)

    def _on_write_error(self, s: Stream, msg: str) -> None:
        g = self.guests.get(s.label[0]) if isinstance(s.label, tuple) else None
        text = "%s cpu%s: writing stopped after %d bytes: %s" % (
            s.label[0], s.label[1], s.written, s.write_error) if g else msg
        self.errors.append(text)
        if g is not None:
            g.write_failed = True
            g.problems.append(text)

    # -- stopping -----------------------------------------------------------------------------
    def _stop_all(self) -> None:
        live = [g for g in self.guests.values() if g.state == "running"]
        sent: Dict[str, Any] = {}
        for g in live:
            t0 = time.monotonic_ns()
            if g.framed:
                g.order_seq += 1
                sent[g.name] = (g.link.send("stop", seq=g.order_seq), t0, g.order_seq)
            else:
                ok = g.link.order(False)
                g.orders.append(["stop", t0, None])
                if not ok:
                    g.problems.append("could not send the stop order")
        deadline = time.monotonic() + ORDER_TIMEOUT_S
        for g in live:
            if g.name not in sent:
                continue
            rid, t0, seq = sent[g.name]
            rep = g.link.wait(rid, max(0.1, deadline - time.monotonic()))
            g.orders.append(["stop", t0, time.monotonic_ns() if rep is not None else None, seq])
            if rep is not None and isinstance(rep.get("stats"), dict):
                g.agent_stats = rep.fields["stats"]
            elif rep is None:
                g.problems.append("no acknowledgement of the stop order")
        self.stopped_ns = time.monotonic_ns()
        for g in live:
            self._refresh_cmdlines(g)
        for g in live:
            g.state = "stopped"
            # Sockets: the guest runs on and so does its agent; closing the control
            # socket tells it we left, and the next `vmtrace record` finds it again.
            # Without bye its tracefs settings stay as configured until it exits.
            if g.layout.transport == "socket" and g.process is None:
                continue
            if g.framed and g.link is not None and not g.link.eof:
                t0 = time.monotonic_ns()
                rep = g.link.call("bye", ORDER_TIMEOUT_S)
                g.orders.append(["bye", t0, time.monotonic_ns() if rep is not None else None])
                if rep is not None and isinstance(rep.get("stats"), dict):
                    g.agent_stats = rep.fields["stats"]

    def _refresh_cmdlines(self, g: Guest) -> None:
        """Take the guest's saved_cmdlines again after the stop, as trace-cmd does.

        Tasks started during the recording are only in the list at the end; tasks that
        exited early may have been evicted from it, so the start's entries are kept for
        pids the end no longer names.
        """
        if not g.framed or g.link is None or g.link.eof:
            return
        rep = g.link.call_idempotent("metadata", METADATA_TIMEOUT_S / 2, every=15.0, kallsyms=False)
        if rep is None or rep.name != "metadata" or len(rep.blob) > self.opts.max_metadata:
            g.problems.append("could not refresh saved_cmdlines after the stop")
            return
        try:
            files = check_metadata(g.name, protocol.unpack_files(rep), self.opts.max_metadata)
        except VmtraceError as exc:
            g.problems.append("saved_cmdlines after the stop: %s" % exc)
            return
        end = files.get("saved_cmdlines")
        if end is not None:
            g.metadata["saved_cmdlines"] = merge_cmdlines(g.metadata.get("saved_cmdlines", b""), end)

    def _close(self, g: Guest) -> None:
        for s in g.listeners.values():
            s.close()
        g.listeners.clear()
        if g.link is not None:
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
                g.problems.append("host agent: %s" % (err.strip().splitlines() or ["exit %s" % g.process.returncode])[-1])
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
        from vmtrace.format.tracedat_write import write_tracedat

        if not g.metadata:
            g.problems.append("no metadata: trace.dat not written")
            return
        agent_cpus = g.agent_stats.get("cpus") if isinstance(g.agent_stats.get("cpus"), dict) else g.agent_stats
        g.metadata = finish_meta(g.metadata, g.name, g.clock, agent_cpus, self._stream_stats(g))
        cpu_files = {}
        for cpu in (g.cpus or list(g.streams)):
            path = os.path.join(g.raw, "cpu%d" % cpu)
            if os.path.exists(path):
                cpu_files[cpu] = path
        target = os.path.join(self.outdir, g.name + ".dat")
        try:
            self._write_metadata(g)
            write_tracedat(target, g.metadata, cpu_files, version=self.opts.file_version,
                           compression=self.opts.compression if self.opts.file_version == 7 else None,
                           options={"hostname": g.name})
        except (VmtraceError, OSError) as exc:
            why = getattr(exc, "strerror", None) or str(exc)
            g.problems.append("%s.dat not written (%s); the raw spool %s is kept (vmtrace report reads it)"
                              % (g.name, why, g.raw))
            self.errors.append("%s: %s.dat not written: %s" % (g.name, g.name, why))
            return
        g.file = os.path.basename(target)
        if not self.opts.keep_raw and not g.write_failed:
            shutil.rmtree(g.raw, ignore_errors=True)

    def _summary(self) -> Dict[str, Any]:
        doc: Dict[str, Any] = {"layout": "vmtrace-session", "version": 1, "outdir": self.outdir,
                               "started_ns": self.started_ns, "stopped_ns": self.stopped_ns,
                               "stop_reason": self.stop_reason, "guests": {}, "errors": list(self.errors)}
        for g in self.guests.values():
            entry = {
                "file": g.file,
                "clock": g.clock,
                "cpus": len(g.cpus) if g.cpus else g.layout.cpus,
                "protocol": "vmtrace" if g.framed else "plain",
                "state": g.state,
                "stats": {"host": self._stream_stats(g), "agent": g.agent_stats},
                "probes": g.probes,
                "orders": g.orders,
                "problems": g.problems,
            }
            if g.file is None:
                entry["raw"] = os.path.basename(g.raw)
            if g.name == HOST_NAME and g.process is not None:
                doc["host"] = dict(entry, clock="mono")
            else:
                doc["guests"][g.name] = entry
        tmp = os.path.join(self.outdir, "session.json.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(doc, f, indent=1)
            os.replace(tmp, os.path.join(self.outdir, "session.json"))
        except OSError as exc:
            self.errors.append("session.json not written: %s" % exc.strerror)
            doc["errors"] = list(self.errors)
        return doc


def record(guests: Sequence[str], outdir: Optional[str] = None, duration: Optional[float] = None,
           events: Optional[Sequence[str]] = None, progress: Optional[Callable[[Session], None]] = None,
           stop: Optional[threading.Event] = None, **options: Any) -> Dict[str, Any]:
    """Record ``guests`` (names under the default base, or directories) into ``outdir``.

    The Python entry point behind ``vmtrace record``; returns the session summary (the
    content of session.json). ``options`` are the fields of :class:`Options`.
    """
    opts = Options(outdir=outdir, duration=duration, events=events, **options)
    return Session(guests, opts, progress=progress, stop=stop).run()


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
