"""Event format texts shared by the decoder and renderer tests (this kernel's layouts)."""
from __future__ import annotations

COMMON_FIELDS = (
    "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;\n"
    "\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;\n"
    "\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;\n"
    "\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;\n"
)

SWITCH_FIELDS = (
    "\tfield:char prev_comm[16];\toffset:8;\tsize:16;\tsigned:0;\n"
    "\tfield:pid_t prev_pid;\toffset:24;\tsize:4;\tsigned:1;\n"
    "\tfield:int prev_prio;\toffset:28;\tsize:4;\tsigned:1;\n"
    "\tfield:long prev_state;\toffset:32;\tsize:8;\tsigned:1;\n"
    "\tfield:char next_comm[16];\toffset:40;\tsize:16;\tsigned:0;\n"
    "\tfield:pid_t next_pid;\toffset:56;\tsize:4;\tsigned:1;\n"
    "\tfield:int next_prio;\toffset:60;\tsize:4;\tsigned:1;\n"
)

SHORT_SWITCH_FMT = '"prev_comm=%s prev_pid=%d", REC->prev_comm, REC->prev_pid'


def event_format(name: str, event_id: int, fields: str, print_fmt: str) -> str:
    """A format file as tracefs writes it: common fields, a blank line, the event's own."""
    return (f"name: {name}\nID: {event_id}\nformat:\n{COMMON_FIELDS}\n{fields}\n"
            f"print fmt: {print_fmt}\n")


def sched_switch(print_fmt: str = SHORT_SWITCH_FMT) -> str:
    return event_format("sched_switch", 372, SWITCH_FIELDS, print_fmt)
