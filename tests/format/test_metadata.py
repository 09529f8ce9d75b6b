"""Metadata parsing: cmdlines, printk formats, kallsyms lookups (checked against the
live kernel's own symbol table and against trace-cmd's symbolised call sites)."""
from __future__ import annotations

import gzip
import os

import pytest

from vmtrace.format.metadata import KallSyms, TraceMetadata, parse_cmdlines, parse_printk_formats

KALLSYMS = b"""ffffffff81000000 T _stext
ffffffff81000100 T do_thing
ffffffff81000180 t helper\t[mymod]
0000000000000000 A hidden
garbage line
ffffffff81000200 T end_marker
"""


def test_cmdlines_and_comm_names():
    cl = parse_cmdlines(b"1 systemd\n20486 bash\nbad line\n7 kworker/0:1 more\n20486 zsh\n")
    assert cl == {1: "systemd", 20486: "zsh", 7: "kworker/0:1 more"}
    md = TraceMetadata(cmdlines=b"5 cat\n")
    assert (md.comm(0), md.comm(5), md.comm(6)) == ("<idle>", "cat", "<...>")


def test_printk_formats():
    pf = parse_printk_formats(b'0xffffffff82a4c0e8 : "Start context switch"\n'
                              b'0xffffffff82a4c100 : "line\\n"\nnonsense\n')
    assert pf == {0xFFFFFFFF82A4C0E8: "Start context switch", 0xFFFFFFFF82A4C100: "line\n"}


@pytest.mark.parametrize("blob", [KALLSYMS, gzip.compress(KALLSYMS)])
def test_kallsyms_lookup(blob):
    ks = KallSyms(blob)
    assert len(ks) == 4
    assert ks.lookup(0xFFFFFFFF81000105) == ("do_thing", 5, 0x80)
    assert ks.format(0xFFFFFFFF81000105) == "do_thing+0x5/0x80"
    assert ks.format(0xFFFFFFFF81000100, with_size=False) == "do_thing"
    assert ks.format(0xFFFFFFFF81000190, with_size=False) == "helper+0x10"
    assert ks.lookup(0x1000) is None and ks.format(0x1000) == "0x1000"


@pytest.mark.tracefs
def test_live_metadata_from_tracefs():
    from vmtrace.tracefs import Tracefs, kallsyms
    if not os.path.exists("/sys/kernel/tracing/saved_cmdlines"):
        pytest.skip("needs tracefs")
    md = TraceMetadata.from_tracefs(Tracefs(), kallsyms=kallsyms())
    assert md.printk and md.clock
    with open("/proc/kallsyms") as f:
        for line in f:
            addr, _, name = line.split()[:3]
            if name == "schedule" and int(addr, 16):
                assert md.kallsyms.lookup(int(addr, 16) + 1)[:2] == ("schedule", 1)
                break
        else:
            pytest.skip("kallsyms addresses are hidden")
