"""The agent itself: sets up tracefs, ports and pumps, obeys the host, shuts down cleanly.

One main thread runs the control loop (control port, signals, placement, --duration);
one pump thread per traced CPU moves pages. Every way out (stop order, ``bye``,
SIGINT, SIGTERM, --duration) goes through the same path: stop the pumps (they flush the
last partial pages), restore the tracefs settings a ``configure`` changed, write the
final stats, print one summary line, exit 0.

Why one module of this size: the Agent is one state machine (set up, configure, start,
stop, host gone, exit) whose steps share its lock, its counters and its undo logs; the
parts that stand alone already live beside it (pumps, placement, the configure recipe,
the self-filter, ports, the control channel, the stream).
"""
from __future__ import annotations

import json
import os
import resource
import select
import signal
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from vmtrace import protocol
from vmtrace.agent import VERSION, metadata, ports, recipe
from vmtrace.agent.control import ControlChannel, Controller
from vmtrace.agent.placement import Placement
from vmtrace.agent.selffilter import KEEP_SYSTEMS, SelfFilter
from vmtrace.agent.pump import EXIT, IDLE, RUN, FdSink, Pump, Sink
from vmtrace.agent.splice import IMPLEMENTATION as SPLICE_IMPL
from vmtrace.agent.stream import StreamSink, StreamWriter, write_metadata_dir
from vmtrace.errors import VmtraceError
from vmtrace.tracefs import CpuStats, Settings, Tracefs, mount, online_cpus, parse_event_spec

# user-space clocks that read the same time base as the trace clock of that name
EXACT_CLOCKS = {
    "mono": ("CLOCK_MONOTONIC", 1),
    "mono_raw": ("CLOCK_MONOTONIC_RAW", 4),
    "boot": ("CLOCK_BOOTTIME", 7),
    "tai": ("CLOCK_TAI", 11),
}
PLACEMENT_PERIOD = 0.5  # a workload that arrives on the pumps' CPU costs events until then


class Options:
    """The agent's settings, as parsed by ``vmtrace.agent.__main__``."""

    def __init__(self, **kw: Any):
        self.instance: Optional[str] = kw.get("instance")
        self.ports_dir: Optional[str] = kw.get("ports_dir")
        self.stdout: bool = kw.get("stdout", False)
        self.output_dir: Optional[str] = kw.get("output_dir")
        self.pipe_size: int = kw.get("pipe_size", 1 << 20)
        self.flush_interval: float = kw.get("flush_interval", 1.0)
        self.pump_cpus: Any = kw.get("pump_cpus", "auto")
        self.start: bool = kw.get("start", False)
        self.duration: Optional[float] = kw.get("duration")
        self.kallsyms: bool = kw.get("kallsyms", True)
        self.exit_grace: float = kw.get("exit_grace", 2.0)
        self.tracefs_root: Optional[str] = kw.get("tracefs_root")
        self.nice: int = kw.get("nice", -10)
        self.trace_self: bool = kw.get("trace_self", False)
        self.pump_priority: Optional[int] = kw.get("pump_priority")  # SCHED_FIFO priority, opt-in

    def as_dict(self) -> Dict[str, Any]:
        return dict(self.__dict__)


def _available_tracers(tf: Tracefs) -> List[str]:
    try:
        return tf.read("available_tracers").split()
    except VmtraceError:
        return []


class Agent:
    def __init__(self, opts: Options):
        self.opts = opts
        root = opts.tracefs_root or mount()
        self.created_instance = False
        if opts.instance is not None:
            self.tf = Tracefs(root, opts.instance)
            if not os.path.isdir(self.tf.path):
                self.tf = Tracefs.create_instance(opts.instance, root)
                self.created_instance = True
        else:
            self.tf = Tracefs(root)
        try:
            self._init_rest(opts)
        except BaseException:
            if self.created_instance:
                try:
                    self.tf.remove()
                except VmtraceError:
                    pass
            raise

    def _init_rest(self, opts: Options) -> None:
        self.online = online_cpus()
        self.cpus = self.tf.cpus()
        have = set()
        try:
            have = {int(n[3:]) for n in os.listdir(self.tf.file("per_cpu")) if n[3:].isdigit()}
        except OSError:
            pass
        self.offline = sorted(have - set(self.online))
        if not self.cpus:
            raise VmtraceError("no online CPU has %s" % self.tf.file("per_cpu", "cpuN", "trace_pipe_raw"))
        self.page_size = self.tf.subbuf_size()
        self.stats0: Dict[int, CpuStats] = {c: self.tf.cpu_stats(c) for c in self.cpus}
        self.pumps: Dict[int, Pump] = {}
        self.running = False
        self.started_once = False
        self.saved: Optional[Settings] = None
        self._size_set: Optional[Tuple[int, int]] = None  # (asked, read back) at the last configure
        self.configured = False
        self.exit_reason: Optional[str] = None
        self.controller: Optional[Controller] = None
        self.channel: Optional[ControlChannel] = None
        self.writer: Optional[StreamWriter] = None
        self.placement = Placement(opts.pump_cpus, self.online)
        self.main_tid = threading.get_native_id()
        self.t_start: Optional[float] = None
        self._marker_fd: Optional[int] = None
        self._lock = threading.RLock()
        self._frozen: Optional[Dict[str, Dict[str, Any]]] = None
        self._carry: Dict[str, Dict[str, Any]] = {}
        self.host_attached = False  # a host has written to the control port since it last went away
        self.self_filter: Optional[SelfFilter] = None  # keeps our own threads' events out
        self.recipe = recipe.Recipe({})                 # tracer, filters, probes ... of the last configure
        self.recipe_log: Optional[recipe.Applied] = None

    # -- setup ---------------------------------------------------------------------------
    def _sinks(self, should_stop: Any) -> Dict[int, Sink]:
        sinks: Dict[int, Sink] = {}
        if self.opts.output_dir:
            os.makedirs(self.opts.output_dir, exist_ok=True)
            for cpu in self.cpus:
                path = os.path.join(self.opts.output_dir, "cpu%d" % cpu)
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                sinks[cpu] = FdSink(fd, path)
            return sinks
        if self.opts.stdout:
            self.writer = StreamWriter(sys.stdout.fileno())
            return {cpu: StreamSink(self.writer, cpu) for cpu in self.cpus}
        names = [ports.data_port_name(c) for c in self.cpus]
        found = ports.locate(names, self.opts.ports_dir)
        for cpu, name in zip(self.cpus, names):
            if name not in found:
                where = self.opts.ports_dir or "%s or %s/*/name" % (ports.DEV_DIR, ports.SYS_DIR)
                raise VmtraceError("no port %s for online CPU %d (looked in %s)" % (name, cpu, where))
        try:
            for cpu, name in zip(self.cpus, names):
                fd = ports.open_port(found[name], True, should_stop)
                if fd is None:
                    raise VmtraceError("interrupted while waiting for port %s" % found[name].path)
                sinks[cpu] = FdSink(fd, found[name].path)
        except BaseException:
            for sink in sinks.values():
                sink.close()
            raise
        return sinks

    def _control(self, should_stop: Any) -> Optional[ControlChannel]:
        if (self.opts.output_dir or self.opts.stdout) and self.opts.ports_dir is None and self.opts.start:
            found = {}
        else:
            found = ports.locate([ports.CTL_PORT], self.opts.ports_dir)
        spec = found.get(ports.CTL_PORT)
        if spec is None:
            if self.opts.start:
                return None
            where = self.opts.ports_dir or "%s or %s/*/name" % (ports.DEV_DIR, ports.SYS_DIR)
            raise VmtraceError("no control port %s (looked in %s); use --start to run without one"
                               % (ports.CTL_PORT, where))
        fd = ports.open_port(spec, False, should_stop)
        if fd is None:
            raise VmtraceError("interrupted while waiting for port %s" % spec.path)
        return ControlChannel(fd, spec.kind, ports.reply_path(spec))

    def setup(self, should_stop: Any) -> None:
        if self.offline:
            print("vmtrace-agent: skipping offline CPUs %s" % ",".join(map(str, self.offline)), file=sys.stderr)
        first = self.placement.initial()
        if first:
            try:
                os.sched_setaffinity(0, first)
            except OSError:
                pass
        self.channel = self._control(should_stop)
        if self.channel is not None:
            self.controller = Controller(self, self.channel)
        sinks = self._sinks(should_stop)
        for cpu in self.cpus:
            self.pumps[cpu] = Pump(cpu, self.tf.trace_pipe_raw(cpu), sinks[cpu], self.page_size,
                                   self.opts.pipe_size, self.opts.flush_interval, self.opts.exit_grace,
                                   self.opts.nice, self.opts.pump_priority)
        for pump in self.pumps.values():
            pump.start()
            pump.started_evt.wait(5)
        self.placement.apply(self._tids(), self.main_tid)
        self._exclude_self()

    def _exclude_self(self) -> None:
        """Keep the agent's own threads out of what it records (``--trace-self`` keeps
        them in). Measured before this (docs/agent.md): on a CPU-bound guest 93 % of the
        recorded events were the agent's own page moves, allocations and timers, and
        with an event-heavy one about half. They cost the guest, fill the buffer the
        user's events need, and bury them. How, and why not a pid list: selffilter.py.
        Called again after every configure, which may enable more events."""
        if self.opts.trace_self:
            return
        if self.self_filter is None:
            try:
                tids = sorted(int(t) for t in os.listdir("/proc/self/task"))
            except OSError:
                tids = [self.main_tid] + [t for t in self._tids().values() if t is not None]
            self.self_filter = SelfFilter(self.tf, tids)
        try:
            enabled = self.tf.enabled_events()
        except VmtraceError:
            return
        for problem in self.self_filter.apply(enabled)[:3]:
            print("vmtrace-agent: cannot keep own events out: %s" % problem, file=sys.stderr)

    def _tids(self) -> Dict[int, Optional[int]]:
        return {cpu: p.tid for cpu, p in self.pumps.items()}

    # -- actions (control thread) ---------------------------------------------------------
    def start(self, mark: Optional[str] = None) -> None:
        """Start pumping (and tracing, once configured). ``mark``: a trace_marker line
        written once tracing is on, so the order itself shows in the trace."""
        with self._lock:
            if self.running:
                return
            if not self.pumps:
                raise VmtraceError("agent is not set up")
            if not self.started_once:
                # Count from the first start: what ftrace overwrote before anyone asked
                # us to read is not the agent's loss.
                self.stats0 = {c: self.tf.cpu_stats(c) for c in self.cpus}
                self._carry = {}
            events = [p.request(RUN) for p in self.pumps.values()]
            for ev in events:
                ev.wait(5)
            if self.configured:
                self.tf.tracing_on = True
            self.running = True
            self.started_once = True
            if self.t_start is None:
                self.t_start = time.monotonic()
            if mark:
                self._marker(mark)

    def stop(self, mark: Optional[str] = None, grace: Optional[float] = None) -> None:
        """Stop; ``mark`` is written to trace_marker first, while tracing is still on.
        ``grace``: how long the pumps wait for the sink to take the rest (default --exit-grace)."""
        with self._lock:
            if not self.running:
                return
            if mark:
                self._marker(mark)
            if self.configured:
                self.tf.tracing_on = False
            events = [p.request(IDLE, grace) for p in self.pumps.values()]
            for ev in events:
                ev.wait(self.opts.exit_grace + 30)
            self.running = False
            # Freeze the counters here: what ftrace overwrites after we stopped reading
            # is not something the agent lost.
            self._frozen = self._stats_now()

    def request_exit(self, reason: str) -> None:
        if self.exit_reason is None:
            self.exit_reason = reason

    def configure(self, fields: Dict[str, Any]) -> None:
        msg = protocol.Message(protocol.CONFIGURE, fields)
        events = protocol.require(msg, "events", list, optional=True)
        clock = protocol.require(msg, "clock", str, optional=True)
        size = protocol.require(msg, "buffer_size_kb", int, optional=True)
        pct = protocol.require(msg, "buffer_percent", int, optional=True)
        want_recipe = recipe.Recipe(fields)
        with self._lock:
            if self.running:
                raise VmtraceError("configure refused while tracing is started; stop first")
            for spec in events or []:
                if not isinstance(spec, str):
                    raise VmtraceError("configure: event %r is not a string" % (spec,))
                if spec.strip() not in ("all", "*"):
                    parse_event_spec(spec)
            if clock is not None and clock not in self.tf.clocks:
                raise VmtraceError("configure: trace clock %r not offered (has: %s)" % (clock, " ".join(self.tf.clocks)))
            if size is not None and not 4 <= size <= (1 << 22):
                raise VmtraceError("configure: buffer_size_kb %d out of range 4..4194304" % size)
            if pct is not None and not 0 <= pct <= 100:
                raise VmtraceError("configure: buffer_percent %d out of range 0..100" % pct)
            if self.saved is None:
                self.saved = self.tf.snapshot()
            self.configured = True
            self.tf.tracing_on = False
            # Only what differs is written. Enabling tracepoints patches kernel text with
            # every vCPU halted, and a new clock or size resets the buffer: in a starved
            # TCG guest that took tens of seconds, and the host resends a configure that
            # got no answer, which must then cost nothing.
            new_recipe = want_recipe != self.recipe
            if new_recipe:
                self._undo_recipe()
                self.recipe_log = recipe.Applied(self.tf)
            try:
                if new_recipe:
                    recipe.create_probes(want_recipe, self.tf, self.recipe_log)
                if events is not None:
                    for spec in events:
                        if spec.strip() not in ("all", "*"):
                            system, event = parse_event_spec(spec)
                            if not os.path.isdir(self.tf.event_dir(system, event)):
                                raise VmtraceError("configure: no such trace event %s" % spec)
                    want = {"%s:%s" % pair for pair in self.tf.event_ids(events)}
                    if set(self.tf.enabled_events()) != want:
                        self.tf.disable_all_events()
                        self.tf.enable_events(events)
                if new_recipe:
                    recipe.apply(want_recipe, self.tf, self.recipe_log)
                    self.recipe = want_recipe
            except VmtraceError:
                # leave the guest's tracefs as it was before this configure
                self._undo_recipe()
                try:
                    self.tf.restore(self.saved)
                except VmtraceError:
                    pass
                raise
            if clock is not None and clock != self.tf.clock:
                self.tf.clock = clock
            # The kernel rounds the size to whole pages (1024 reads back as 1027), so a
            # size counts as set if we set it and it still reads back the same.
            if size is not None and self._size_set != (size, self.tf.buffer_size_kb):
                self.tf.buffer_size_kb = size
                self._size_set = (size, self.tf.buffer_size_kb)
            if pct is not None:
                self.tf.buffer_percent = pct
            # A new clock or size resets the ring buffer and its counters: carry what was
            # counted so far and count from the new baseline.
            self._carry = self._stats_now()
            self.stats0 = {c: self.tf.cpu_stats(c) for c in self.cpus}
            self._exclude_self()   # events this configure enabled

    def _undo_recipe(self) -> List[str]:
        """Take back what the last configure's recipe set (events off first: an enabled
        probe cannot be removed)."""
        if self.recipe_log is None or not self.recipe_log.steps:
            self.recipe, self.recipe_log = recipe.Recipe({}), None
            return []
        try:
            self.tf.disable_all_events()
        except VmtraceError:
            pass
        problems = self.recipe_log.undo()
        self.recipe, self.recipe_log = recipe.Recipe({}), None
        return problems

    # -- information ------------------------------------------------------------------------
    def hello_fields(self) -> Dict[str, Any]:
        tf = self.tf
        return {
            "protocol": protocol.VERSION,
            "agent_version": VERSION,
            "kernel": os.uname().release,
            "hostname": os.uname().nodename,
            "machine": os.uname().machine,
            "cpus": self.cpus,
            "offline": self.offline,
            "nr_cpus": max(self.cpus + self.offline) + 1,
            "page_size": self.page_size,
            "long_size": metadata.long_size(),
            "endian": sys.byteorder,
            "clocks": tf.clocks,
            "clock": tf.clock,
            "instance": tf.instance,
            "buffer_size_kb": tf.buffer_size_kb,
            "buffer_percent": tf.buffer_percent,
            "events": tf.enabled_events(),
            "tracers": _available_tracers(tf),
            "running": self.running,
            "python": "%d.%d.%d" % sys.version_info[:3],
            "splice": SPLICE_IMPL,
            "self_excluded": self._self_info(),
        }

    def _self_info(self) -> Dict[str, Any]:
        """What hello and the stats say about the agent's own activity."""
        f = self.self_filter
        return {"trace_self": bool(self.opts.trace_self), "tids": f.tids if f else [],
                "method": ("event filter on common_pid, every system but %s" % " and ".join(KEEP_SYSTEMS)
                           if f else None),
                "events_filtered": f.events_filtered if f else 0}

    def _agent_info(self) -> Dict[str, Any]:
        ru = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "version": VERSION,
            "pid": os.getpid(),
            "python": "%d.%d.%d" % sys.version_info[:3],
            "splice": SPLICE_IMPL,
            "cpu_time_s": round(ru.ru_utime + ru.ru_stime, 4),
            "pump_cpus": self.placement.describe(),
            "self_excluded": self._self_info(),
        }

    def stats(self) -> Dict[str, Dict[str, Any]]:
        """Per-CPU counters since the agent started (frozen at the last stop)."""
        if not self.running and self._frozen is not None:
            return self._frozen
        return self._stats_now()

    def _stats_now(self) -> Dict[str, Dict[str, Any]]:
        out: Dict[str, Dict[str, Any]] = {}
        for cpu in self.cpus:
            try:
                now = self.tf.cpu_stats(cpu)
            except VmtraceError:
                now = self.stats0[cpu]
            s0 = self.stats0[cpu]
            p = self.pumps[cpu].stats if cpu in self.pumps else None
            overrun = max(0, now.overrun - s0.overrun)
            dropped = max(0, now.dropped_events - s0.dropped_events)
            carry = self._carry.get(str(cpu), {})
            overrun += carry.get("overrun", 0)
            dropped += carry.get("dropped_events", 0)
            out[str(cpu)] = {
                "entries": now.entries,
                "overrun": overrun,
                "dropped_events": dropped,
                "read_events": max(0, now.read_events - s0.read_events) + carry.get("read_events", 0),
                "bytes_sent": p.bytes_sent if p else 0,
                "pages_sent": p.pages_sent if p else 0,
                "partial_pages": p.partial_pages if p else 0,
                "pages_dropped": p.pages_dropped if p else 0,
                "lost_events": overrun + dropped,
                "error": p.error if p else None,
            }
        return out

    def stats_fields(self) -> Dict[str, Any]:
        return {"cpus": self.stats(), "agent": self._agent_info(), "running": self.running}

    def metadata_files(self, with_kallsyms: bool = True, stats: Optional[Dict[str, Any]] = None) -> Dict[str, bytes]:
        meta = metadata.meta(self.tf, self.cpus, self.offline, self.page_size, self._agent_info(),
                             self._options(), stats)
        return metadata.collect(self.tf, meta, with_kallsyms)

    def _options(self) -> Dict[str, Any]:
        o = self.opts.as_dict()
        o["buffer_percent"] = self.tf.buffer_percent
        o["buffer_size_kb"] = self.tf.buffer_size_kb
        if not isinstance(o.get("pump_cpus"), (str, list)):
            o["pump_cpus"] = str(o.get("pump_cpus"))
        o["ftrace"] = self.recipe.as_dict()     # tracer, filters, probes ... as configured
        return o

    def read_clock(self) -> Dict[str, Any]:
        try:
            clock = self.tf.clock
        except VmtraceError:
            clock = "unknown"
        name, num = EXACT_CLOCKS.get(clock, ("CLOCK_MONOTONIC", 1))
        cid = getattr(time, name, num)
        return {"clock": clock, "guest_ns": time.clock_gettime_ns(cid), "source": name,
                "approximate": clock not in EXACT_CLOCKS}

    def time_probe(self, seq: Optional[int], reading: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        fields = dict(reading or self.read_clock())
        fields["seq"] = seq
        fields["marker"] = self._marker("vmtrace-probe seq=%s\n" % seq)
        return fields

    def _marker(self, text: str) -> bool:
        try:
            if self._marker_fd is None:
                self._marker_fd = os.open(self.tf.file("trace_marker"), os.O_WRONLY | os.O_CLOEXEC)
            os.write(self._marker_fd, text.encode())
            return True
        except OSError:
            return False

    # -- output of metadata -----------------------------------------------------------------
    def _write_metadata(self, final: bool) -> None:
        stats = self.stats() if final else None
        if final:
            # kallsyms does not change while we run; only refresh what can
            meta = metadata.meta(self.tf, self.cpus, self.offline, self.page_size, self._agent_info(),
                                 self._options(), stats)
            files = {"saved_cmdlines": self.tf.saved_cmdlines(),
                     "meta.json": json.dumps(meta, indent=1, sort_keys=True).encode()}
            files.update(metadata.event_formats(self.tf))
        else:
            files = self.metadata_files(self.opts.kallsyms)
        if self.opts.output_dir:
            write_metadata_dir(self.opts.output_dir, files)
        elif self.writer is not None:
            self.writer.message(protocol.pack_files(files))
            if final:
                self.writer.message(protocol.msg("end", stats=stats))

    # -- main loop ----------------------------------------------------------------------------
    def run(self) -> int:
        sig_r, sig_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        old_wakeup = signal.set_wakeup_fd(sig_w)
        caught: List[int] = []

        def on_signal(signum: int, frame: Any) -> None:
            caught.append(signum)
            self.request_exit(signal.Signals(signum).name)

        old = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            self.setup(lambda: bool(caught))
            if self.opts.start and self.exit_reason is None:
                self.start()  # before gathering metadata: the ring buffer will not wait
            self._write_metadata(final=False)
            self._loop(sig_r)
        finally:
            self._shutdown()
            signal.set_wakeup_fd(old_wakeup)
            for s, h in old.items():
                signal.signal(s, h)
            os.close(sig_r)
            os.close(sig_w)
        return 0

    def _loop(self, sig_r: int) -> None:
        next_place = time.monotonic() + PLACEMENT_PERIOD
        ctl_quiet_until = 0.0
        while self.exit_reason is None:
            now = time.monotonic()
            if self.opts.duration is not None and self.t_start is not None:
                left = self.t_start + self.opts.duration - now
                if left <= 0:
                    self.request_exit("duration")
                    break
            else:
                left = None
            p = select.poll()
            p.register(sig_r, select.POLLIN)
            ch = self.channel
            if ch is not None and now >= ctl_quiet_until:
                p.register(ch.fd, select.POLLIN)
            timeout = max(0.0, next_place - now)
            if left is not None:
                timeout = min(timeout, left)
            if ch is not None and now < ctl_quiet_until:
                timeout = min(timeout, ctl_quiet_until - now)
            try:
                events = p.poll(int(timeout * 1000) + 1)
            except InterruptedError:
                continue
            for fd, ev in events:
                if fd == sig_r:
                    try:
                        os.read(sig_r, 64)
                    except BlockingIOError:
                        pass
                elif ch is not None and fd == ch.fd and self.controller is not None:
                    if ev & select.POLLIN:
                        self.controller.on_readable()
                        if not ch.eof:
                            self.host_attached = True
                    elif ev & (select.POLLHUP | select.POLLERR):
                        ch.eof = True
                    if ch.eof and self.exit_reason is None:
                        # The host went away (recorder stopped or killed, QEMU's socket
                        # chardev disconnected). The guest runs on, so do we: stop
                        # pumping, keep tracefs as it is, and wait for the next host.
                        self._host_gone(ch)
                        if ch.kind == "socket":
                            self._reconnect()
                        else:
                            # a virtio port without a host attached reports HUP: listen again later
                            ch.eof = False
                            ctl_quiet_until = time.monotonic() + 0.5
            if time.monotonic() >= next_place:
                self.placement.reevaluate(self._tids(), self.main_tid)
                next_place = time.monotonic() + PLACEMENT_PERIOD

    def _host_gone(self, ch: ControlChannel) -> None:
        if self.host_attached or self.running:
            print("vmtrace-agent: the host went away (%s closed); %swaiting for it to come back"
                  % (ch.kind, "tracing stopped, " if self.running else ""), file=sys.stderr)
        self.host_attached = False
        if self.controller is not None:
            self.controller.reset()  # a half-received frame of the old host is void
        if self.running:
            # nobody will take what the pumps hold: drop it now (counted), do not wait
            self.stop(grace=0.0)

    def _reconnect(self) -> None:
        """Unix-socket ports (--ports): connect again, control first, once a host listens."""
        stop = lambda: self.exit_reason is not None  # noqa: E731 - SIGINT/SIGTERM end the wait
        if self.channel is not None:
            self.channel.close()
        self.channel = None
        self.controller = None
        noted = False
        while not stop():
            try:
                channel = self._control(stop)
            except VmtraceError as exc:
                # the port may be missing for a moment while a new recorder rebinds it
                if not noted and not stop():
                    print("vmtrace-agent: waiting for the host: %s" % exc, file=sys.stderr)
                    noted = True
                time.sleep(0.1)
                continue
            try:
                sinks = self._sinks(stop)
            except VmtraceError:
                channel.close()
                time.sleep(0.1)
                continue
            for cpu, pump in self.pumps.items():
                pump.replace_sink(sinks[cpu])
            self.channel = channel
            self.controller = Controller(self, channel)
            print("vmtrace-agent: a host connected again", file=sys.stderr)
            return

    def _shutdown(self) -> None:
        try:
            self.stop()
        finally:
            for pump in self.pumps.values():
                pump.request(EXIT)
            for pump in self.pumps.values():
                pump.join(self.opts.exit_grace + 30)
        # The recipe first (it turns events off, so that its probes can be removed), then
        # the settings a configure changed, and our own filters last: they put back each
        # event's filter from before the agent came.
        errors = self._undo_recipe()
        if self.saved is not None:
            try:
                self.tf.restore(self.saved)
            except VmtraceError as exc:
                errors.append(str(exc))
        if self.self_filter is not None:
            errors.extend(self.self_filter.restore()[:3])
        if self.pumps:
            try:
                self._write_metadata(final=True)
            except (OSError, VmtraceError) as exc:
                errors.append("final metadata: %s" % exc)
        if self._marker_fd is not None:
            os.close(self._marker_fd)
        if self.channel is not None:
            self.channel.close()
        if self.created_instance:
            # rmdir answers EBUSY while anything still holds the instance's buffers open
            # (a reader of trace_pipe outside us, a pump thread still closing): retry a
            # little before leaving it behind, and then say so.
            deadline = time.monotonic() + 3.0
            while True:
                try:
                    self.tf.remove()
                    break
                except VmtraceError as exc:
                    if time.monotonic() >= deadline:
                        errors.append("%s (left behind)" % exc)
                        break
                    time.sleep(0.1)
        for e in errors:
            print("vmtrace-agent: %s" % e, file=sys.stderr)
        if self.pumps:
            print(self.summary(), file=sys.stderr)

    def summary(self) -> str:
        st = self.stats()
        total = sum(s["bytes_sent"] for s in st.values())
        pages = sum(s["pages_sent"] for s in st.values())
        partial = sum(s["partial_pages"] for s in st.values())
        lost = sum(s["lost_events"] for s in st.values())
        dropped = sum(s["pages_dropped"] for s in st.values())
        info = self._agent_info()
        per100 = info["cpu_time_s"] / (total / 100e6) if total else 0.0
        return ("vmtrace-agent: cpus %s: %.1f MB in %d pages (%d partial), %d lost events, %d pages dropped, "
                "cpu %.2f s (%.2f s/100MB), pumps on %s, stopped by %s"
                % (",".join(map(str, self.cpus)), total / 1e6, pages, partial, lost, dropped,
                   info["cpu_time_s"], per100, info["pump_cpus"], self.exit_reason or "end"))
