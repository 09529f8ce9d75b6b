"""Write Perfetto's own protobuf trace format, with ftrace events in their native form.

The Perfetto UI (https://ui.perfetto.dev) and ``trace_processor`` read the result as if
Perfetto's ``traced_probes`` had recorded it, so they build their own CPU scheduling
tracks, thread states and thread names from the sched events, one set per machine.
Field names and numbers come from Perfetto's schema (the PyPI package ``perfetto``
ships it compiled as ``perfetto/protos/perfetto/trace/perfetto_trace_pb2.py``); the tests
decode our files with that schema and compare every event with the trace it came from.

Encoding (proto sources under https://github.com/google/perfetto/tree/main/protos):

* The file is a ``Trace``: ``TracePacket`` after ``TracePacket`` as field 1, written one
  packet at a time. Events go into ``FtraceEventBundle`` packets (``ftrace_events``,
  packet field 1), one bundle per (machine, CPU) holding up to ``BUNDLE_EVENTS`` events
  with non-decreasing timestamps: a per-CPU ring buffer read in order is what
  ``traced_probes`` writes, and what the trace processor's sorter is built for (it
  sorts each CPU's queue and merges the CPUs, docs/concepts/buffers.md and
  src/trace_processor/sorter/trace_sorter.h). An event earlier than the last one of its
  bundle closes the bundle, so the property always holds. Memory is one open bundle
  per (machine, CPU), whatever the trace size.
* Each ``FtraceEvent`` carries ``timestamp`` (field 1), then ``pid`` (field 2, the event's
  common_pid), then the event: in that order because the trace processor's tokenizer
  reads exactly that prefix on its fast path (ftrace_tokenizer.cc). Events the schema
  has a typed message for (``_TYPED``: sched_switch, sched_wakeup/_new, sched_waking,
  sched_process_exit/fork/free/exec/wait/hang, task_newtask/rename, print, irq,
  softirq, cpu_idle, ...) are written typed, but only when every field the kernel
  recorded has a place in that message and its value fits the declared type. Anything
  else, e.g. a newer kernel's sched_process_exit with ``group_dead``, and every other
  event, is a ``GenericFtraceEvent`` (``event_name`` and ``field`` entries with
  ``str_value``, ``int_value`` or ``uint_value``): no event and no field is dropped.
  Arrays and other non-scalar values are written as text (``[1, 2, 3]``).
* Events the kernel dropped (vmtrace's lost-events markers) set ``lost_events`` on the
  next bundle of that CPU, Perfetto's own flag for "data was lost before this bundle"
  (ftrace_event_bundle.proto). The flag is a bool: the count is not representable.
* Thread and process names: from the comm fields of the sched and task events, which
  the trace processor's sched parser uses to name threads. No ``ProcessTree`` packets:
  their ``Thread`` entries need the tgid (the process a thread belongs to), which a
  trace.dat does not record (saved_cmdlines is pid -> comm only); a missing tgid is read
  as 0 and would put every thread in process 0 (process_tracker.cc ``UpdateThread``),
  and process_tree.proto asks to be filled "only with accurate information coming from
  the system".
* Several machines (a session: host and guests): every packet of a guest carries
  ``TracePacket.machine_id`` (field 98), the way ``traced_relay`` tags packets from
  another kernel; the trace processor then keeps a separate set of CPUs, threads and
  processes per machine (https://perfetto.dev/docs/deployment/multi-machine-architecture).
  The host is machine 0 (the field is left out), guests 1, 2, ... in order of
  appearance. Each machine first gets a ``SystemInfo`` packet with ``machine_name``
  (``host`` or the guest's name), which fills the ``machine.name`` column the UI shows
  (https://perfetto.dev/docs/concepts/merging-traces).
* Clocks: timestamps are written as they are, nanoseconds on the host's
  CLOCK_MONOTONIC for a session (the merge has already mapped every guest onto it) or
  on the trace's own clock for a single trace. An ftrace bundle cannot say
  "MONOTONIC": its ``ftrace_clock`` enum only has boot (the default, left unset),
  global, local and mono_raw, and the non-boot ones need (ftrace, boot) timestamp pairs
  we do not have. So Perfetto treats them as its default ftrace clock, BOOTTIME; the
  values shown are ours unchanged. Across machines each machine's clock is a separate
  node of Perfetto's clock graph (docs/concepts/clock-sync.md, "Clocks across traces
  and machines"). Rather than leaving the guests to the trace processor's fallback
  guess (same clock domain on two machines related at offset zero, "only if nothing
  better exists", docs/concepts/merging-traces.md), each guest gets a
  ``RemoteClockSync`` packet (field 107), the record ``traced_relay`` writes of its
  clock pings with the host, stating an offset of exactly zero: true of this file,
  where the guest's timestamps are already host timestamps. Its two rounds are built
  so that both of the trace processor's offset estimates ((c1 + c2) / 2 - h1 and
  c2 - (h1 + h2) / 2, proto_trace_reader.cc ``CalculateClockOffsets``) are 0.
  No ``ClockSnapshot`` is written: it would have to pair our clock with a real
  BOOTTIME reading, which no session records.

Not verified here (no trace_processor can run on this machine): how a given
trace_processor/UI version lays out the tracks, and that it applies the zero offset as
its source reads (the fallback would give the same zero). The tests check every byte
against the official schema and every value against the decoded trace.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple

from vmtrace.errors import VmtraceError
from vmtrace.export import Export, Tally
from vmtrace.export import protowire as pw
from vmtrace.session import HOST, LOST, event_name

BUNDLE_EVENTS = 1024          # events per FtraceEventBundle at most
BUNDLE_BYTES = 256 << 10      # ... and bytes

# TracePacket fields
_P_FTRACE, _P_SYSTEM_INFO, _P_MACHINE, _P_REMOTE_SYNC = 1, 45, 98, 107
# TracePacket.timestamp, trusted_packet_sequence_id, track_event, sequence_flags, track_descriptor
_P_TS, _P_SEQ_ID, _P_TRACK_EVENT, _P_SEQ_FLAGS, _P_TRACK_DESC = 8, 10, 11, 13, 60
_SEQ_CLEARED, _SEQ_NEEDS = 1, 2          # TracePacket.SequenceFlags
_SLICE_BEGIN, _SLICE_END = 1, 2          # TrackEvent.Type
_VCPU_SEQ = 15                           # our packet sequence for the vCPU-thread tracks
_K_PACKET = pw.key(1, pw.LEN)                      # Trace.packet
_K_EVENT = pw.key(2, pw.LEN)                       # FtraceEventBundle.event
_K_TS, _K_PID = pw.key(1, pw.VARINT), pw.key(2, pw.VARINT)   # FtraceEvent
_GENERIC = 327                                     # FtraceEvent.generic
_BOOTTIME = 6                                      # BuiltinClock.BUILTIN_CLOCK_BOOTTIME

# Typed messages: "system:event" -> (FtraceEvent field, "kernel_field:proto_field:type ...").
# Kernel and proto field names agree for these; a kernel field not listed sends the
# event to the generic form.
_SAME_WAKE = "comm:1:string pid:2:int32 prio:3:int32 success:4:int32 target_cpu:5:int32"
_TYPED_SPEC = {
    "sched:sched_switch": (4, "prev_comm:1:string prev_pid:2:int32 prev_prio:3:int32 "
                              "prev_state:4:int64 next_comm:5:string next_pid:6:int32 next_prio:7:int32"),
    "sched:sched_wakeup": (17, _SAME_WAKE),
    "sched:sched_waking": (20, _SAME_WAKE),
    "sched:sched_wakeup_new": (114, _SAME_WAKE),
    "sched:sched_migrate_task": (491, "comm:1:string pid:2:int32 prio:3:int32 orig_cpu:4:int32 "
                                      "dest_cpu:5:int32 running:6:int32 load:7:uint32"),
    "sched:sched_process_exec": (237, "filename:1:string pid:2:int32 old_pid:3:int32"),
    "sched:sched_process_exit": (238, "comm:1:string pid:2:int32 tgid:3:int32 prio:4:int32"),
    "sched:sched_process_fork": (239, "parent_comm:1:string parent_pid:2:int32 "
                                      "child_comm:3:string child_pid:4:int32"),
    "sched:sched_process_free": (240, "comm:1:string pid:2:int32 prio:3:int32"),
    "sched:sched_process_hang": (241, "comm:1:string pid:2:int32"),
    "sched:sched_process_wait": (242, "comm:1:string pid:2:int32 prio:3:int32"),
    "sched:sched_pi_setprio": (353, "comm:1:string newprio:2:int32 oldprio:3:int32 pid:4:int32"),
    "task:task_newtask": (235, "pid:1:int32 comm:2:string clone_flags:3:uint64 oom_score_adj:4:int32"),
    "task:task_rename": (236, "pid:1:int32 oldcomm:2:string newcomm:3:string oom_score_adj:4:int32"),
    "ftrace:print": (3, "ip:1:uint64 buf:2:string"),
    "irq:irq_handler_entry": (36, "irq:1:int32 name:2:string"),
    "irq:irq_handler_exit": (37, "irq:1:int32 ret:2:int32"),
    "irq:softirq_entry": (24, "vec:1:uint32"),
    "irq:softirq_exit": (25, "vec:1:uint32"),
    "irq:softirq_raise": (26, "vec:1:uint32"),
    "power:cpu_idle": (13, "state:1:uint32 cpu_id:2:uint32"),
    "power:cpu_frequency": (11, "state:1:uint32 cpu_id:2:uint32"),
    "raw_syscalls:sys_exit": (330, "id:1:int64 ret:2:int64"),
    "workqueue:workqueue_execute_start": (58, "work:1:uint64 function:2:uint64"),
    "workqueue:workqueue_execute_end": (57, "work:1:uint64 function:2:uint64"),
}

Typed = Tuple[bytes, Dict[str, Tuple[bytes, str]]]     # (event key, {kernel field: (key, type)})


def _compile(spec: Dict[str, Tuple[int, str]]) -> Dict[str, Typed]:
    out: Dict[str, Typed] = {}
    for full, (number, fields) in spec.items():
        table = {}
        for item in fields.split():
            name, field, kind = item.split(":")
            wire = pw.LEN if kind == "string" else pw.VARINT
            table[name] = (pw.key(int(field), wire), kind)
        out[full] = (pw.key(number, pw.LEN), table)
        out.setdefault(full.split(":", 1)[1], out[full])     # events that carry no system
    return out


_TYPED = _compile(_TYPED_SPEC)


def _typed(typed: Typed, fields: Dict[str, Any]) -> Optional[bytes]:
    """The typed message, or None if a field has no place in it or does not fit."""
    event_key, table = typed
    parts = []
    for name, value in fields.items():
        slot = table.get(name)
        if slot is None or not pw.fits(slot[1], value):
            return None
        k, kind = slot
        if kind == "string":
            parts.append(pw.framed(k, pw.text(value)))
        else:
            parts.append(k + pw.varint(value & 0xFFFFFFFFFFFFFFFF))
    return pw.framed(event_key, b"".join(parts))


_INT, _UINT, _STR = pw.key(4, pw.VARINT), pw.key(5, pw.VARINT), pw.key(3, pw.LEN)
_K_FIELD, _K_GENERIC = pw.key(2, pw.LEN), pw.key(_GENERIC, pw.LEN)
_U64 = (1 << 64) - 1
_INT64 = 1 << 63


def _generic_value(value: Any, unsigned: bool) -> bytes:
    """GenericFtraceEvent.Field's value: str_value (3), int_value (4) or uint_value (5).
    Integers keep the signedness the event format declares for the field."""
    if type(value) is not int and hasattr(value, "item") and not hasattr(value, "__len__"):
        value = value.item()                         # a numpy scalar
    if isinstance(value, int):
        if 0 <= value <= _U64 and (unsigned or value >= _INT64):
            return _UINT + pw.varint(value)
        if -_INT64 <= value < _INT64:
            return _INT + pw.varint(value & _U64)
    if isinstance(value, (bytes, bytearray)):
        value = bytes(value).split(b"\0", 1)[0].decode("utf-8", "replace")
    elif hasattr(value, "tolist"):
        value = value.tolist()
    if isinstance(value, (list, tuple)):
        value = "[%s]" % ", ".join(str(v) for v in value)
    return pw.framed(_STR, pw.text(value if isinstance(value, str) else str(value)))


class _Names(dict):
    """Encoded name fields (field 1, a string), made once per distinct name."""

    def __missing__(self, name: str) -> bytes:
        b = self[name] = pw.string(1, name)
        return b


_NAMES = _Names()


def _generic(name: str, fields: Dict[str, Any], unsigned: frozenset) -> bytes:
    parts = [_NAMES[name]]
    for k, v in fields.items():
        if v is None:
            continue
        field = _NAMES[k] + _generic_value(v, k in unsigned)
        parts.append(pw.framed(_K_FIELD, field))
    return pw.framed(_K_GENERIC, b"".join(parts))


class _Bundle:
    __slots__ = ("events", "size", "last_ts", "lost")

    def __init__(self, lost: bool = False) -> None:
        self.events: List[bytes] = []
        self.size = 0
        self.last_ts = -1
        self.lost = lost


class PerfettoWriter:
    """Turns events into TracePackets on a binary file object, one packet at a time.

    Events are vmtrace.api events (one trace) or vmtrace.session.MergedEvent (a session,
    ``.source`` names the machine), in time order; lost-events markers of either kind
    are understood."""

    def __init__(self, out: Any, name: Optional[str] = None) -> None:
        self.out = out
        self.name = name                 # machine name of events without a source
        self.machines: Dict[Optional[str], int] = {}
        self.bundles: Dict[Tuple[int, int], _Bundle] = {}
        self.unsigned: Dict[int, frozenset] = {}
        self.events = self.typed = self.generic = self.lost = self.packets = 0

    # -- packets -------------------------------------------------------------------------
    def _packet(self, machine: int, body: bytes) -> None:
        if machine:
            body = pw.integer(_P_MACHINE, "uint32", machine) + body
        self.out.write(pw.framed(_K_PACKET, body))
        self.packets += 1

    def _machine(self, source: Optional[str], ts: int) -> int:
        m = self.machines.get(source)
        if m is not None:
            return m
        m = 0 if source in (None, HOST) else 1 + sum(1 for s in self.machines if s not in (None, HOST))
        self.machines[source] = m
        name = self.name if source is None else source
        if name:
            self._packet(m, pw.message(_P_SYSTEM_INFO, [pw.string(17, name)]))   # machine_name
        if m:
            self._packet(m, _zero_offset_sync(max(ts, 1)))
        return m

    def _flush(self, key: Tuple[int, int], lost_next: bool = False) -> None:
        b = self.bundles.pop(key, None)
        if b is not None and (b.events or b.lost):
            parts = [pw.integer(1, "uint32", key[1])]                 # cpu
            if b.lost:
                parts.append(pw.integer(3, "bool", 1))               # lost_events
            parts.extend(b.events)
            self._packet(key[0], pw.message(_P_FTRACE, parts))
        if lost_next:
            self.bundles[key] = _Bundle(lost=True)

    # -- events --------------------------------------------------------------------------
    def _unsigned(self, fmt: Any) -> frozenset:
        if fmt is None:
            return frozenset()
        u = self.unsigned.get(id(fmt))
        if u is None:
            u = self.unsigned[id(fmt)] = frozenset(
                f.name for f in getattr(fmt, "fields", ()) if not getattr(f, "signed", True))
        return u

    def _body(self, e: Any, name: str) -> bytes:
        fields = e.fields
        system = getattr(e, "system", "") or ""
        typed = _TYPED.get(name if not system else system + ":" + name)
        if typed is not None:
            body = _typed(typed, fields)
            if body is not None:
                self.typed += 1
                return body
        self.generic += 1
        fmt = getattr(e, "fmt", None) or getattr(getattr(e, "origin", None), "fmt", None)
        return _generic(name, fields, self._unsigned(fmt))

    def add(self, e: Any) -> None:
        ts, cpu = int(e.ts), int(e.cpu)
        if ts < 0:
            raise VmtraceError("event at negative time %d ns (cpu %d): Perfetto timestamps are unsigned"
                               % (ts, cpu))
        key = (self._machine(getattr(e, "source", None), ts), cpu)
        name = event_name(e)
        b = self.bundles.get(key)
        if name == LOST:
            self.lost += 1
            if b is not None and not b.events:
                b.lost = True
            else:
                self._flush(key, lost_next=True)
            return
        if b is None:
            b = self.bundles[key] = _Bundle()
        elif ts < b.last_ts:
            self._flush(key)
            b = self.bundles[key] = _Bundle()
        ev = _K_TS + pw.varint(ts) + _K_PID + pw.varint(int(e.pid) & 0xFFFFFFFF) + self._body(e, name)
        ev = pw.framed(_K_EVENT, ev)
        b.events.append(ev)
        b.size += len(ev)
        b.last_ts = ts
        self.events += 1
        if len(b.events) >= BUNDLE_EVENTS or b.size >= BUNDLE_BYTES:
            self._flush(key)

    def close(self) -> None:
        for key in sorted(self.bundles):
            self._flush(key)


def _zero_offset_sync(ts: int) -> bytes:
    """RemoteClockSync with two rounds in which guest and host clocks read alike.

    Readings go client, host, client, host (t, t+1, t+2, t+3) as in a real ping round,
    so both estimates the trace processor makes are exactly 0 and the client readings
    (added to its clock graph as snapshots) increase."""
    def clocks(field: int, t: int) -> bytes:            # ClockSnapshot{clocks: [Clock]}
        clock = pw.message(1, (pw.integer(1, "uint32", _BOOTTIME), pw.integer(2, "uint64", t)))
        return pw.length_delimited(field, clock)
    rounds = [pw.message(1, (clocks(2, t), clocks(3, t + 1))) for t in (ts, ts + 2)]
    return pw.message(_P_REMOTE_SYNC, rounds)


@contextlib.contextmanager
def _resolve(x: Any, name: Optional[str]) -> Iterator[Tuple[Iterable[Any], Optional[str]]]:
    """(events, machine name) of a path, a Source or events; what is opened here is
    closed here. A single trace's machine is named after it; a session's events each
    carry their source."""
    from vmtrace.source import is_source, opened
    if isinstance(x, (str, os.PathLike)) or is_source(x):
        with opened(x) as src:
            single = src.kind != "session"
            yield src.events(), name or (_machine_name(src.identity) if single else None)
        return
    yield x, name


def _machine_name(identity: Tuple[str, str]) -> Optional[str]:
    kind, name = identity
    return None if (kind, name) == ("trace", "trace") else name


def _session_of(x: Any) -> Any:
    """The vmtrace.session.Session behind a session path or Source, else None."""
    from vmtrace.session import Session, is_session_dir
    from vmtrace.source import is_source
    if isinstance(x, (str, os.PathLike)):
        return Session(os.fspath(x)) if is_session_dir(os.fspath(x)) else None
    if is_source(x) and getattr(x, "kind", "") == "session":
        return x.session
    return None


def vcpu_track_packets(session: Any) -> Iterator[bytes]:
    """TracePacket bodies for one track per guest vCPU host thread (clocksync/steal.py):
    a ``TrackDescriptor`` named ``NAME vCPU N: host thread TID`` on the host machine,
    and ``TrackEvent`` slices ``vCPU running`` / ``steal (ran: TASK)`` / ``steal
    (waking)``, on the session's clock like everything else in the file."""
    from vmtrace.clocksync import steal

    seq = pw.integer(_P_SEQ_ID, "uint32", _VCPU_SEQ)
    first = True
    uuid = 0x7615_0000
    for name in session.guests:
        if "vcpu_threads" not in (session.source(name).sync or {}):
            continue
        try:
            cpu2tid, by_tid = steal.session_states(session, name)
        except VmtraceError:
            continue
        shared = len(set(cpu2tid.values())) < len(cpu2tid)     # thread=single: one thread, one track
        for cpu, tid in sorted(cpu2tid.items()):
            if shared and cpu != min(cpu2tid):
                continue
            uuid += 1
            label = "%s vCPUs: host thread %d" % (name, tid) if shared else "%s vCPU %d: host thread %d" % (name, cpu, tid)
            desc = pw.message(_P_TRACK_DESC, [pw.integer(1, "uint64", uuid), pw.string(2, label)])
            flags = pw.integer(_P_SEQ_FLAGS, "uint32", _SEQ_CLEARED if first else _SEQ_NEEDS)
            first = False
            yield seq + flags + desc
            for sp in by_tid[tid].spans:
                if sp.state == "running":
                    label = "vCPU running"
                elif sp.state == "preempted":
                    label = "steal (ran: %s)" % sp.other
                elif sp.state == "waking":
                    label = "steal (waking)"
                else:
                    continue
                for ts, kind in ((sp.start, _SLICE_BEGIN), (sp.end, _SLICE_END)):
                    parts = [pw.integer(9, "int32", kind), pw.integer(11, "uint64", uuid)]
                    if kind == _SLICE_BEGIN:
                        parts.append(pw.string(23, label))
                    yield (pw.integer(_P_TS, "uint64", max(int(ts), 0)) + seq
                           + pw.integer(_P_SEQ_FLAGS, "uint32", _SEQ_NEEDS) + pw.message(_P_TRACK_EVENT, parts))


def write_perfetto(events: Any, path: str, *, name: Optional[str] = None, session: Any = None) -> str:
    """Write a Perfetto protobuf trace (``.perfetto-trace``/``.pftrace``) and return its path.

    ``events``: a path, a Source (:mod:`vmtrace.source`), or events in time order (e.g.
    a session's). ``name`` names the machine of a single trace (default: from
    session.json beside it, or the trace's hostname). A session (``session``, or a
    session path or Source as ``events``) also gets its vCPU host-thread tracks
    (:func:`vcpu_track_packets`)."""
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        f = open(path, "wb", buffering=1 << 20)
    except OSError as exc:
        raise VmtraceError("%s: cannot write: %s" % (path, exc.strerror or exc)) from None
    try:
        with f, _resolve(events, name) as (evs, machine_name):
            w = PerfettoWriter(f, machine_name)
            for e in evs:
                w.add(e)
            w.close()
            session = session if session is not None else _session_of(events)
            if session is not None:
                for body in vcpu_track_packets(session):
                    w._packet(0, body)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(path)         # no half-written trace left behind
        raise
    return path


FORMAT = Export("perfetto", "Perfetto's protobuf trace (e.g. -o x.perfetto-trace; opens in "
                "https://ui.perfetto.dev), one machine per source", needs_file=True)


def write(source: Any, out: str, selection: Any) -> Optional[str]:
    """The registry's entry: the selection of ``source`` as a Perfetto trace."""
    tally = Tally()
    name = None if source.kind == "session" else _machine_name(source.identity)
    write_perfetto(tally.watch(source.events(**selection.kwargs())), out, name=name,
                   session=getattr(source, "session", None) if source.kind == "session" else None)
    return tally.summary(out)
