"""The Perfetto protobuf export, read back with Perfetto's official schema.

``perfetto_trace_pb2`` (PyPI ``perfetto``) is the compiled schema of the whole trace
format and ``google.protobuf`` its decoder: every file written here is parsed with
``Trace.FromString`` and compared, event by event and field by field, with the trace
it came from. A wrong field number, wire type or value fails these tests.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tracemalloc
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest

pytest.importorskip("google.protobuf")
pb = pytest.importorskip("perfetto.protos.perfetto.trace.perfetto_trace_pb2")

from hypothesis import given, settings, strategies as st  # noqa: E402

import realtrace  # noqa: E402
from vmtrace import api  # noqa: E402
from vmtrace import session as merge  # noqa: E402
from vmtrace.errors import VmtraceError  # noqa: E402
from vmtrace.export import perfetto as perfetto_proto, protowire as pw  # noqa: E402

VMTRACE = str(Path(sys.executable).with_name("vmtrace"))
BOOTTIME = pb.BuiltinClock.Value("BUILTIN_CLOCK_BOOTTIME")


# -- protowire against the official encoder and decoder -------------------------------------
def _same_as_official(ours: bytes, official: Any) -> None:
    """Our bytes decode to the message, and are the bytes protobuf itself writes."""
    assert type(official).FromString(ours) == official
    assert ours == official.SerializeToString()


VARINT_EDGES = [0, 1, 127, 128, 255, 256, 16383, 16384, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                2**35, 2**56, 2**63 - 1, 2**63, 2**64 - 1]


@pytest.mark.parametrize("v", VARINT_EDGES)
def test_uint64_varints_at_boundaries(v):
    # ClockSnapshot.Clock.timestamp is uint64, field 2
    _same_as_official(pw.integer(2, "uint64", v), pb.ClockSnapshot.Clock(timestamp=v))
    assert len(pw.varint(v)) == max(1, -(-v.bit_length() // 7))


@pytest.mark.parametrize("v", [0, 1, -1, 127, -128, 2**31 - 1, -(2**31), 2**63 - 1, -(2**63), -(2**32)])
def test_int64_negative_is_ten_byte_twos_complement(v):
    # GenericFtraceEvent.Field.int_value is int64, field 4
    _same_as_official(pw.integer(4, "int64", v), pb.GenericFtraceEvent.Field(int_value=v))
    if v < 0:
        assert len(pw.integer(4, "int64", v)) == 1 + 10


@pytest.mark.parametrize("v", [0, -1, 2**31 - 1, -(2**31), 1234567])
def test_int32_fields(v):
    # SchedSwitchFtraceEvent.prev_pid is int32, field 2; protobuf sign-extends negatives
    _same_as_official(pw.integer(2, "int32", v), pb.SchedSwitchFtraceEvent(prev_pid=v))


def test_uint32_bool_string_and_nested():
    _same_as_official(pw.integer(1, "uint32", 2**32 - 1), pb.FtraceEventBundle(cpu=2**32 - 1))
    _same_as_official(pw.integer(3, "bool", 1), pb.FtraceEventBundle(lost_events=True))
    _same_as_official(pw.string(1, "héllo ✓"), pb.GenericFtraceEvent(event_name="héllo ✓"))
    field = pw.message(2, [pw.string(1, "x"), pw.integer(5, "uint64", 2**64 - 1)])
    _same_as_official(pw.string(1, "e") + field, pb.GenericFtraceEvent(
        event_name="e", field=[pb.GenericFtraceEvent.Field(name="x", uint_value=2**64 - 1)]))
    # a lone surrogate (undecodable bytes kept by surrogateescape) cannot be UTF-8
    assert pb.GenericFtraceEvent.FromString(pw.string(1, "a\udcff")).event_name == "a\ufffd"


@pytest.mark.parametrize("kind,v", [("int32", 2**31), ("int32", -(2**31) - 1), ("uint32", -1),
                                    ("uint32", 2**32), ("uint64", -1), ("uint64", 2**64),
                                    ("int64", 2**63), ("bool", 2), ("int64", "7")])
def test_out_of_range_is_refused(kind, v):
    assert not pw.fits(kind, v)
    with pytest.raises(ValueError):
        pw.integer(1, kind, v)
    with pytest.raises(ValueError):
        pw.varint(-1)


@settings(max_examples=300, deadline=None)
@given(ts=st.integers(0, 2**64 - 1), pid=st.integers(-(2**31), 2**31 - 1),
       state=st.integers(-(2**63), 2**63 - 1), comm=st.text(max_size=40),
       n=st.integers(-(2**63), 2**64 - 1))
def test_property_round_trip(ts, pid, state, comm, n):
    sw = pw.string(1, comm) + pw.integer(2, "int32", pid) + pw.integer(4, "int64", state)
    ev = pw.integer(1, "uint64", ts) + pw.length_delimited(4, sw)
    want = pb.FtraceEvent(timestamp=ts, sched_switch=pb.SchedSwitchFtraceEvent(
        prev_comm=comm.encode("utf-8", "replace").decode(), prev_pid=pid, prev_state=state))
    _same_as_official(ev, want)
    kind = "int64" if n < 2**63 else "uint64"
    got = pb.GenericFtraceEvent.Field.FromString(pw.integer(4 if kind == "int64" else 5, kind, n))
    assert (got.int_value if kind == "int64" else got.uint_value) == n


# -- reading a written trace back -------------------------------------------------------------
def read(path) -> Any:
    return pb.Trace.FromString(Path(path).read_bytes())


def proto_event(ev: Any) -> Tuple[str, Dict[str, Any]]:
    """(event name, fields) of a decoded FtraceEvent, typed or generic."""
    which = ev.WhichOneof("event")
    if which == "generic":
        return ev.generic.event_name, {f.name: getattr(f, f.WhichOneof("value")) for f in ev.generic.field}
    return which, {f.name: v for f, v in getattr(ev, which).ListFields()}


def expected_fields(e: Any) -> Dict[str, Any]:
    """What the schema should hold for an event's fields: arrays as text, None left out."""
    out = {}
    for k, v in e.fields.items():
        if isinstance(v, (list, tuple)):
            v = "[%s]" % ", ".join(map(str, v))
        if v is not None:
            out[k] = v
    return out


def bundles(trace: Any) -> List[Any]:
    return [p for p in trace.packet if p.HasField("ftrace_events")]


def per_track(trace: Any) -> Dict[Tuple[int, int], List[Any]]:
    """(machine_id, cpu) -> decoded FtraceEvents in file order."""
    out: Dict[Tuple[int, int], List[Any]] = defaultdict(list)
    for p in bundles(trace):
        out[(p.machine_id, p.ftrace_events.cpu)].extend(p.ftrace_events.event)
    return out


def check_bundles(trace: Any) -> None:
    """What Perfetto expects of ftrace bundles, and the tokenizer's fast-path layout."""
    for p in bundles(trace):
        b = p.ftrace_events
        assert b.HasField("cpu")
        assert not b.HasField("ftrace_clock")          # boot, the default ftrace clock
        ts = [e.timestamp for e in b.event]
        assert ts == sorted(ts)
        assert len(b.event) <= perfetto_proto.BUNDLE_EVENTS
        for e in b.event:
            raw = e.SerializeToString()
            assert raw[0] == 0x08 and e.HasField("pid")   # timestamp first (field 1, varint)


def compare_events(ours: List[Any], theirs: List[Any]) -> Counter:
    """Event by event: timestamp, pid, name and every field. Returns the kinds seen."""
    assert len(ours) == len(theirs)
    kinds: Counter = Counter()
    for mine, e in zip(ours, theirs):
        name, fields = proto_event(mine)
        assert (mine.timestamp, mine.pid) == (int(e.ts), int(e.pid) & 0xFFFFFFFF)
        assert name == merge.event_name(e)
        assert fields == expected_fields(e), (name, fields, e.fields)
        kinds["generic" if mine.WhichOneof("event") == "generic" else "typed"] += 1
    return kinds


def lost_positions(items: List[Any]) -> set:
    """Index (among events) of the event each lost marker precedes."""
    out, n = set(), 0
    for x in items:
        if merge.event_name(x) == merge.LOST:
            out.add(n)
        else:
            n += 1
    return out


def flagged_positions(trace: Any, machine: int, cpu: int) -> set:
    out, n = set(), 0
    for p in bundles(trace):
        if (p.machine_id, p.ftrace_events.cpu) == (machine, cpu):
            if p.ftrace_events.lost_events:
                out.add(n)
            n += len(p.ftrace_events.event)
    return out


# -- real traces from this machine --------------------------------------------------------------
@pytest.fixture(scope="module")
def rich_trace(tmp_path_factory) -> Path:
    """sched (switch, wakeup, waking, fork, exec, exit...), irq, timer, with a workload."""
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    out = tmp_path_factory.mktemp("pftrace") / "rich.dat"
    return realtrace.record_tracedat(out, events=("sched", "irq", "timer", "task"), buffer_kb=2048)


@pytest.mark.tracefs
@pytest.mark.oracle
def test_real_trace_every_event_and_field(rich_trace, tmp_path):
    out = perfetto_proto.write_perfetto(str(rich_trace), str(tmp_path / "t.pftrace"))
    trace = read(out)
    check_bundles(trace)
    tracks = per_track(trace)
    with api.open(rich_trace) as t:
        items = list(t.events())
    by_cpu: Dict[int, List[Any]] = defaultdict(list)
    for e in items:
        by_cpu[e.cpu].append(e)
    assert {c for (m, c), v in tracks.items() if v} == {
        c for c, v in by_cpu.items() if any(e.kind == "event" for e in v)}
    kinds: Counter = Counter()
    for cpu, evs in by_cpu.items():
        events = [e for e in evs if e.kind == "event"]
        assert len(tracks[(0, cpu)]) == len(events)          # count per CPU
        kinds += compare_events(tracks[(0, cpu)], events)
        assert flagged_positions(trace, 0, cpu) == lost_positions(evs)
    assert all(m == 0 for m, _ in tracks)                    # one machine: no machine_id
    assert kinds["typed"] > 0 and kinds["generic"] > 0
    names = Counter(proto_event(e)[0] for v in tracks.values() for e in v)
    assert names["sched_switch"] > 0 and names["sched_waking"] > 0
    switches = [e for v in tracks.values() for e in v if e.WhichOneof("event") == "sched_switch"]
    want = Counter(e.event for e in items if e.kind == "event")
    assert len(switches) == want["sched:sched_switch"]      # typed, never generic, on this kernel
    assert sum(1 for v in tracks.values() for e in v
               if e.WhichOneof("event") == "sched_process_fork") == want["sched:sched_process_fork"]


# -- a session: host and a guest on one clock ----------------------------------------------------
@pytest.fixture(scope="module")
def session(tmp_path_factory) -> Path:
    if not (realtrace.have_tracefs() and realtrace.have_trace_cmd()):
        pytest.skip("needs tracefs and trace-cmd")
    import pseudosession as ps
    return ps.make_pseudo_session(tmp_path_factory.mktemp("pfsess") / "sess", n_probes=15)


def _sync_offsets(sync: Any) -> List[int]:
    """Both of the trace processor's offset estimates for each pair of rounds."""
    rounds = [(r.client_clocks.clocks[0], r.host_clocks.clocks[0]) for r in sync.synced_clocks]
    for c, h in rounds:
        assert c.clock_id == h.clock_id == BOOTTIME
    out = []
    for (c1, h1), (c2, h2) in zip(rounds, rounds[1:]):
        t1c, t1h, t2c, t2h = c1.timestamp, h1.timestamp, c2.timestamp, h2.timestamp
        assert t1c < t1h < t2c < t2h and all((t1c, t1h, t2c, t2h))
        out += [(t1c + t2c) // 2 - t1h, t2c - (t1h + t2h) // 2]
    return out


@pytest.mark.tracefs
@pytest.mark.oracle
def test_session_machines_and_clock(session, tmp_path):
    events = list(merge.Session(str(session)).merged())
    out = perfetto_proto.write_perfetto(events, str(tmp_path / "s.perfetto-trace"))
    trace = read(out)
    check_bundles(trace)
    names = {p.machine_id: p.system_info.machine_name for p in trace.packet if p.HasField("system_info")}
    assert names == {0: "host", 1: "guest1"}
    assert not any(p.HasField("clock_snapshot") for p in trace.packet)
    syncs = [(i, p) for i, p in enumerate(trace.packet) if p.HasField("remote_clock_sync")]
    assert [p.machine_id for _, p in syncs] == [1]           # the guest only
    assert _sync_offsets(syncs[0][1].remote_clock_sync) == [0, 0]
    first_guest_bundle = min(i for i, p in enumerate(trace.packet)
                             if p.HasField("ftrace_events") and p.machine_id == 1)
    assert syncs[0][0] < first_guest_bundle                  # the edge exists before its events
    # every event on its machine and CPU, in order, host-clock timestamps unchanged
    tracks = per_track(trace)
    machine = {"host": 0, "guest1": 1}
    by_track: Dict[Tuple[int, int], List[Any]] = defaultdict(list)
    for e in events:
        by_track[(machine[e.source], e.cpu)].append(e)
    assert {k for k, v in tracks.items() if v} == {
        k for k, v in by_track.items() if any(e.event != merge.LOST for e in v)}
    for k, evs in by_track.items():
        real = [e for e in evs if e.event != merge.LOST]
        compare_events(tracks[k], real)
        assert flagged_positions(trace, *k) == lost_positions(evs)
    # the guest traced with tai (~1.8e18 ns) and is written on the host's clock
    g0 = min(e.timestamp for k, v in tracks.items() if k[0] == 1 for e in v)
    h0 = min(e.timestamp for k, v in tracks.items() if k[0] == 0 for e in v)
    assert abs(g0 - h0) < 10 * 10**9
    probe = next(e for k, v in tracks.items() if k[0] == 1 for e in v
                 if e.WhichOneof("event") == "print" and "vmtrace-probe" in e.print.buf)
    assert probe.print.buf.startswith("vmtrace-probe seq=")


def run_report(*args: Any, rc: int = 0) -> subprocess.CompletedProcess:
    p = subprocess.run([VMTRACE, "report", *map(str, args)], capture_output=True, text=True, timeout=300)
    assert p.returncode == rc, p.stderr[-2000:]
    return p


@pytest.mark.tracefs
@pytest.mark.oracle
def test_cli_session_perfetto_and_chrome(session, tmp_path):
    f = tmp_path / "cli.perfetto-trace"
    p = run_report(session, "--format", "perfetto", "-o", f)
    n = sum(1 for e in merge.Session(str(session)).merged() if e.event != merge.LOST)
    assert p.stderr.startswith("vmtrace: wrote %d events" % n) and "from 2 sources" in p.stderr
    assert p.stderr.count("\n") == 1 and p.stdout == ""
    api_file = perfetto_proto.write_perfetto(str(session), str(tmp_path / "api.perfetto-trace"))
    assert f.read_bytes() == Path(api_file).read_bytes()      # the CLI writes what the API writes
    assert sum(len(p.ftrace_events.event) for p in bundles(read(f))) == n
    g = tmp_path / "cli.json"
    p = run_report(session, "--format", "chrome", "-o", g)
    doc = json.loads(g.read_text())
    procs = {e["args"]["name"] for e in doc["traceEvents"] if e.get("name") == "process_name"}
    assert procs == {"host", "guest1"} and "from 2 sources" in p.stderr


@pytest.mark.tracefs
@pytest.mark.oracle
def test_cli_single_trace(real_trace, tmp_path):
    f = tmp_path / "one.pftrace"
    p = run_report(real_trace, "--format", "perfetto", "-o", f)
    with api.open(real_trace) as t:
        n = sum(1 for e in t.events() if e.kind == "event")
        n0 = sum(1 for e in t.events(cpus=[0], events=["sched:sched_switch"]) if e.kind == "event")
    assert "wrote %d events" % n in p.stderr and "from 1 source " in p.stderr
    assert sum(len(b.ftrace_events.event) for b in bundles(read(f))) == n
    # the selection options apply, as for the other formats
    run_report(real_trace, "--format", "perfetto", "--cpu", "0", "--events", "sched:sched_switch", "-o", f)
    evs = [e for b in bundles(read(f)) for e in b.ftrace_events.event]
    assert len(evs) == n0 and all(e.WhichOneof("event") == "sched_switch" for e in evs)
    g = tmp_path / "one.json"
    p = run_report(real_trace, "--format", "chrome", "-o", g)
    assert g.stat().st_size > 0 and "wrote %d events" % n in p.stderr
    for fmt in ("perfetto", "chrome"):
        p = run_report(real_trace, "--format", fmt, rc=2)
        assert p.stderr == "vmtrace: error: --format %s needs -o FILE\n" % fmt
    p = run_report(real_trace, "--format", "perfetto", "-o", "/proc/no/such/dir/x.pftrace", rc=2)
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr


# -- encoder behaviour on constructed events -------------------------------------------------------
def ev(ts, cpu, event, fields, source="host", pid=7, system="sched") -> merge.MergedEvent:
    return merge.MergedEvent(ts, source, cpu, pid, "x", event, fields, system, ts)


SW = {"prev_comm": "a", "prev_pid": 1, "prev_prio": 120, "prev_state": 1,
      "next_comm": "b", "next_pid": 2, "next_prio": 120}


def write_events(events, tmp_path, name="t.pftrace") -> Any:
    return read(perfetto_proto.write_perfetto(events, str(tmp_path / name)))


def test_bundles_split_on_time_going_back_and_on_lost_events(tmp_path):
    lost = ev(25, 0, merge.LOST, {"count": 3}, system="")
    evs = [ev(10, 0, "sched_switch", SW), ev(30, 0, "sched_switch", SW), ev(20, 0, "sched_switch", SW),
           lost, lost, ev(40, 0, "sched_switch", SW), ev(50, 1, "sched_switch", SW),
           ev(60, 1, merge.LOST, {"count": -1}, system="")]
    trace = write_events(evs, tmp_path)
    check_bundles(trace)
    got = sorted([([e.timestamp for e in p.ftrace_events.event], p.ftrace_events.cpu,
                   p.ftrace_events.lost_events) for p in bundles(trace)], key=lambda b: b[1])   # per CPU
    assert got == [([10, 30], 0, False), ([20], 0, False), ([40], 0, True), ([50], 1, False), ([], 1, True)]


def test_typed_only_when_every_field_fits(tmp_path):
    exit_new = {"comm": "sh", "pid": 5, "prio": 120, "group_dead": 1}     # Linux 6.x: no proto field
    big = dict(SW, next_pid=2**40)                                         # does not fit int32
    evs = [ev(1, 0, "sched_switch", SW), ev(2, 0, "sched_process_exit", exit_new),
           ev(3, 0, "sched_switch", big), ev(4, 0, "sched_process_exit", {"comm": "sh", "pid": 5, "prio": 1}),
           ev(5, 0, "hrtimer_start", {"hrtimer": 2**64 - 1, "mode": -3, "arr": [1, 2], "raw": b"ab\0cd",
                                      "gone": None}, system="timer")]
    got = [proto_event(e) for e in per_track(write_events(evs, tmp_path))[(0, 0)]]
    assert got[0] == ("sched_switch", SW)
    assert got[1] == ("sched_process_exit", exit_new)
    assert got[2] == ("sched_switch", big)
    assert got[3][0] == "sched_process_exit"
    assert got[4] == ("hrtimer_start", {"hrtimer": 2**64 - 1, "mode": -3, "arr": "[1, 2]", "raw": "ab"})
    events = [e for p in bundles(write_events(evs, tmp_path, "u.pftrace")) for e in p.ftrace_events.event]
    assert [e.WhichOneof("event") for e in events] == ["sched_switch", "generic", "generic",
                                                       "sched_process_exit", "generic"]


def test_generic_ints_follow_the_field_signedness(real_trace, tmp_path):
    with api.open(real_trace) as t:
        items = [e for e in t.events() if e.kind == "event"][:5000]
        unsigned = {e.name: {f.name for f in e.fmt.fields if not f.signed} for e in items if e.fmt}
        trace = write_events(items, tmp_path)
    seen: Counter = Counter()
    for p in bundles(trace):
        for x in p.ftrace_events.event:
            if x.WhichOneof("event") != "generic":
                continue
            for f in x.generic.field:
                kind = f.WhichOneof("value")
                seen[kind] += 1
                if kind != "str_value":
                    assert kind == ("uint_value" if f.name in unsigned[x.generic.event_name] else "int_value")
    assert seen["uint_value"] > 0 and seen["int_value"] > 0


def test_negative_time_is_a_one_line_error(tmp_path):
    with pytest.raises(VmtraceError, match="negative time"):
        perfetto_proto.write_perfetto([ev(-5, 0, "sched_switch", SW)], str(tmp_path / "n.pftrace"))
    assert not (tmp_path / "n.pftrace").exists()


def test_guests_only_and_names(tmp_path):
    evs = [ev(100, 0, "sched_switch", SW, source="g2"), ev(101, 0, "sched_switch", SW, source="g1"),
           ev(102, 1, "sched_switch", SW, source="host")]
    trace = write_events(evs, tmp_path)
    names = {p.machine_id: p.system_info.machine_name for p in trace.packet if p.HasField("system_info")}
    assert names == {1: "g2", 2: "g1", 0: "host"}
    assert set(per_track(trace)) == {(1, 0), (2, 0), (0, 1)}
    sync = [p for p in trace.packet if p.HasField("remote_clock_sync")]
    assert [p.machine_id for p in sync] == [1, 2]
    assert sync[0].remote_clock_sync.synced_clocks[0].client_clocks.clocks[0].timestamp == 100


def test_memory_stays_flat(tmp_path):
    """A long stream is written as it comes: memory is one open bundle per CPU."""
    def stream(n):
        for i in range(n):
            yield ev(1000 + i, i % 4, "sched_switch", SW, source="host" if i % 3 else "g")

    def peak(n):
        tracemalloc.start()
        try:
            perfetto_proto.write_perfetto(stream(n), str(tmp_path / ("m%d.pftrace" % n)))
            return tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()

    small, large = peak(20_000), peak(200_000)
    assert large < small * 1.5 + (1 << 20), (small, large)
    assert (tmp_path / "m200000.pftrace").stat().st_size > 200_000 * 20
