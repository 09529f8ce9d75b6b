"""The trace-cmd report line layout, piece by piece (the oracle test covers whole files)."""
from __future__ import annotations

from types import SimpleNamespace as NS

from vmtrace.format.events import parse_format
from vmtrace.format.metadata import TraceMetadata
from vmtrace.format.render import TextRenderer, event_name_column, lost_text, time_column
from fmt_texts import sched_switch

SWITCH = sched_switch('"prev_comm=%s prev_pid=%d prev_prio=%d prev_state=%s ==> next_comm=%s next_pid=%d next_prio=%d", REC->prev_comm, REC->prev_pid, REC->prev_prio, REC->prev_state ? "S" : "R", REC->next_comm, REC->next_pid, REC->next_prio').encode()


def _switch_payload(prev_comm, prev_pid, state, next_comm, next_pid, common_pid):
    import struct
    return (struct.pack("<HBBi", 372, 0, 0, common_pid) + prev_comm.encode().ljust(16, b"\0")
            + struct.pack("<iiq", prev_pid, 120, state) + next_comm.encode().ljust(16, b"\0")
            + struct.pack("<ii", next_pid, 120))


def test_columns():
    assert time_column(435_271_214_499) == "  435.271214"
    assert time_column(435_271_214_500) == "  435.271215"     # rounded to nearest µs
    assert time_column(123_456_999_999_600) == "123457.000000"   # wider than 5 digits
    assert time_column(1_999_999_600) == "    2.000000"       # rounding carries into seconds
    assert event_name_column("kfree") == "kfree: " + " " * 15
    assert event_name_column("mm_page_alloc_zone_locked") == "mm_page_alloc_zone_locked: "
    assert lost_text(1, 27722) == "CPU:1 [27722 EVENTS DROPPED]"
    assert lost_text(0, -1) == "CPU:0 [EVENTS DROPPED]"


def test_event_line_plugin_and_comm_learning():
    fmt = parse_format(SWITCH, system="sched")
    md = TraceMetadata(cmdlines=b"100 sh\n")
    r = TextRenderer(md)
    ev = NS(ts=5_000_000_123, cpu=1, pid=100, fmt=fmt,
            payload=_switch_payload("sh", 100, 1, "worker", 4242, 100))
    line = r.event_line(ev)
    assert line == ("              sh-100   [001]     5.000000: sched_switch:         "
                    "sh:100 [120] S ==> worker:4242 [120]")
    # the sched_switch plugin taught the renderer pid 4242's name, as trace-cmd does
    ev2 = NS(ts=5_000_001_000, cpu=1, pid=4242, fmt=fmt,
             payload=_switch_payload("worker", 4242, 0, "swapper/1", 0, 4242))
    assert r.event_line(ev2).startswith("          worker-4242  [001]     5.000001: ")
    assert r.event_line(ev2).endswith("worker:4242 [120] R ==> swapper/1:0 [120]")


def test_drop_marker_and_prefix_rules():
    fmt = parse_format(SWITCH, system="sched")
    r = TextRenderer(TraceMetadata())
    lost = NS(kind="lost", cpu=0, count=12, ts=1)
    ev = NS(kind="event", ts=2_000, cpu=0, pid=0, fmt=fmt,
            payload=_switch_payload("a", 1, 0, "b", 2, 0))
    lines = list(r.lines([ev, lost, ev, ev], prefix="inst: "))
    assert lines[0].startswith("inst:           <idle>-0     [000]")
    assert lines[1] == "inst: CPU:0 [12 EVENTS DROPPED]"
    assert lines[2].startswith("          <idle>-0 ")        # same chunk: no second prefix
    assert lines[3].startswith("inst: ")


def test_short_payload_never_raises():
    fmt = parse_format(SWITCH, system="sched")
    r = TextRenderer(TraceMetadata())
    ev = NS(ts=1, cpu=0, pid=3, fmt=fmt, payload=b"\x74\x01\x00\x00\x03\x00\x00\x00abc")
    line = r.event_line(ev)
    assert "[FAILED TO PARSE]" in line
