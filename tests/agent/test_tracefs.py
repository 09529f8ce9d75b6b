"""tracefs.py against this machine's real tracefs (in a private instance)."""
from __future__ import annotations

import os

import pytest

from vmtrace.errors import VmtraceError
from vmtrace.tracefs import CpuStats, Tracefs, parse_cpu_list, parse_event_spec


def test_parse_cpu_list():
    assert parse_cpu_list("0-3,5,7-8") == [0, 1, 2, 3, 5, 7, 8]
    assert parse_cpu_list("1") == [1]
    assert parse_cpu_list("") == []
    with pytest.raises(VmtraceError, match="not a range"):
        parse_cpu_list("3-1")
    with pytest.raises(VmtraceError, match="not a number"):
        parse_cpu_list("a")


@pytest.mark.parametrize("spec,want", [
    ("sched", ("sched", None)),
    ("sched:sched_switch", ("sched", "sched_switch")),
    ("sched/sched_switch", ("sched", "sched_switch")),
    ("sched:*", ("sched", None)),
])
def test_parse_event_spec(spec, want):
    assert parse_event_spec(spec) == want


@pytest.mark.parametrize("bad", ["../../etc", "sched:..", "a b", "sched:x/../../y"])
def test_event_spec_cannot_escape_events_dir(bad):
    with pytest.raises(VmtraceError, match="bad event name"):
        parse_event_spec(bad)


def test_cpu_stats_parse():
    text = ("entries: 12\noverrun: 3\ncommit overrun: 0\nbytes: 4096\n"
            "oldest event ts:  1234.500000\nnow ts:  1240.000001\n"
            "dropped events: 7\nread events: 99\n")
    st = CpuStats.parse(text)
    assert (st.entries, st.overrun, st.bytes, st.dropped_events, st.read_events) == (12, 3, 4096, 7, 99)
    assert st.oldest_event_ts == 1234.5


@pytest.fixture
def instance():
    tf = Tracefs.create_instance(f"vmtrace-test-tracefs-{os.getpid()}")
    yield tf
    tf.remove()


@pytest.mark.tracefs
def test_instance_settings_round_trip(instance: Tracefs):
    before = instance.snapshot()
    instance.tracing_on = False
    instance.clock = "mono"
    instance.buffer_size_kb = 256
    instance.enable_events(["sched:sched_switch", "timer"])
    assert instance.clock == "mono"
    assert 256 <= instance.buffer_size_kb <= 256 + 8  # rounded up to whole sub-buffers
    enabled = set(instance.enabled_events())
    assert "sched:sched_switch" in enabled
    assert any(e.startswith("timer:") for e in enabled)
    instance.restore(before)
    assert instance.clock == before.clock
    assert set(instance.enabled_events()) == set(before.events)
    assert instance.tracing_on == before.tracing_on


@pytest.mark.tracefs
def test_instance_does_not_touch_top_level(instance: Tracefs):
    top = Tracefs()
    top_before = (top.clock, top.enabled_events())
    instance.clock = "boot"
    instance.enable_events(["sched"])
    assert (top.clock, top.enabled_events()) == top_before


@pytest.mark.tracefs
def test_unknown_clock_and_event_are_one_line_errors(instance: Tracefs):
    with pytest.raises(VmtraceError, match="not offered"):
        instance.clock = "sundial"
    with pytest.raises(VmtraceError, match="no such trace event"):
        instance.enable_events(["nosuchsystem:nosuchevent"])


@pytest.mark.tracefs
def test_metadata_files_and_cpus(instance: Tracefs):
    assert b"commit" in instance.header_page()
    assert b"type_len" in instance.header_event()
    fmt = instance.event_format("sched", "sched_switch")
    assert fmt.startswith(b"name: sched_switch")
    assert instance.cpus() and all(os.path.exists(instance.trace_pipe_raw(c)) for c in instance.cpus())
    assert instance.subbuf_size() % 4096 == 0
    pairs = instance.event_ids(["sched:sched_switch", "timer"])
    assert ("sched", "sched_switch") in pairs and any(s == "timer" for s, _ in pairs)
