"""An ``api.Trace`` over event batches made in memory, for renderer tests that need
what real traces rarely show (see report/test_report_fast.py, format/test_plugins.py)."""
from __future__ import annotations

from types import SimpleNamespace as NS

from fmt_texts import sched_switch
from vmtrace import api
from vmtrace.format.events import EventCatalog
from vmtrace.format.metadata import TraceMetadata

SWITCH = sched_switch().encode()

TESTEV = b"""name: ev
ID: 500
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int val;\toffset:8;\tsize:4;\tsigned:1;
\tfield:char name[8];\toffset:12;\tsize:8;\tsigned:0;
\tfield:__data_loc char[] msg;\toffset:20;\tsize:4;\tsigned:0;
\tfield:unsigned long flags;\toffset:24;\tsize:8;\tsigned:0;

print fmt: "val=%d name=%s msg=%s pad=[%-6s] hex=%#x f=%s 100%%", REC->val, REC->name, __get_str(msg), REC->name, REC->val, __print_flags(REC->flags, "|", { 1, "A" }, { 2, "B" })
"""


class FakeTrace(api.Trace):
    """An api.Trace over batches made in memory."""

    def __init__(self, batches: dict, name: str = "inst"):
        self._made = batches
        cpus = [NS(cpu=c, size=1) for c in sorted(batches)]
        self.source = NS(buffers=[NS(name=name, cpus=cpus)], nr_cpus=len(cpus), long_size=8,
                         endian="<", kallsyms=None, options={})
        self.keep_going = False
        self.name = "fake"
        self.catalog = EventCatalog.from_texts([], [("sched", SWITCH), ("test", TESTEV)])
        self.metadata = TraceMetadata(cmdlines=b"7 known\n")
        self.ts_offset = 0
        self._endian = "<"
        self._common = api._common_layout(self.catalog, "<")
        self.problems = []

    def batches(self, cpu, buffer=None):
        yield from self._made[cpu]
