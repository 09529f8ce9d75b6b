"""The recorder stops and starts again while the guest runs on (socket transport).

`vmtrace prepare --transport socket`: the recorder listens, QEMU connects with
reconnect=1. One boot of the lab guest (TCG) with the agent running in it; two
recordings one after the other into two session directories. Between them the guest
is not touched: the first recorder closing its sockets is all the agent sees (a control
port hang-up), and the second one must get hello again, configure, and record.
`trace-cmd report` is the oracle for both trace.dat files.
"""
from __future__ import annotations

import re
import subprocess
import time

import pytest

from labguest import lab_image

pytestmark = [pytest.mark.vm, pytest.mark.oracle, pytest.mark.slow, pytest.mark.timeout(240)]

EVENT = re.compile(r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+\d+\.\d+:\s+(?P<event>\w+):", re.M)

# keeps the guest busy (and the ring buffer fed) for longer than the test needs
WORKLOAD = "i=0\nwhile [ $i -lt 1000 ]; do pingpong 0.2 > /dev/null; i=$((i + 1)); done"


def _events(path) -> list:
    out = subprocess.run(["trace-cmd", "report", "-i", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-500:]
    assert out.stdout.splitlines()[0] == "cpus=2"
    return list(EVENT.finditer(out.stdout))


def test_recorder_restarts_on_a_running_guest_over_sockets(tmp_path):
    from vmtrace.lab.demo import AGENT_READY, guest_script
    from vmtrace.host.layout import prepare
    from vmtrace.host.recording import record
    from vmtrace.lab.qemu import Guest

    lay = prepare("rs", 2, str(tmp_path / "guests"), transport="socket")
    script = guest_script(WORKLOAD, wait_for_tracing=False)
    with Guest(lab_image(), script=script, qemu_args=lay.qemu_args(), smp=2, accel="tcg",
               workdir=tmp_path / "qemu") as guest:
        guest.wait_ready(90)
        t_end = time.monotonic() + 60
        while not any(l.startswith("VMTRACE-DEMO AGENT-") for l in guest.script_lines()):
            assert guest.running and time.monotonic() < t_end, guest.script_lines()[-5:]
            time.sleep(0.1)
        assert any(l.startswith(AGENT_READY) for l in guest.script_lines()), guest.script_lines()[-5:]

        docs = []
        for n, events in enumerate((["sched"], ["sched", "timer"])):
            doc = record([lay.path], outdir=str(tmp_path / ("out%d" % n)), duration=2.0, events=events,
                         hello_timeout=10.0, connect_timeout=30.0, kallsyms=False)
            docs.append(doc)
        assert guest.running, "the guest stopped between the recordings"

    for n, doc in enumerate(docs):
        g = doc["guests"]["rs"]
        assert g["protocol"] == "vmtrace" and g["state"] == "stopped" and g["problems"] == [], g
        assert [o[0] for o in g["orders"]] == ["start", "stop"]  # no bye: the agent stays for the next one
        evs = _events(tmp_path / ("out%d" % n) / g["file"])
        assert len(evs) > 100, n
        names = {m["event"] for m in evs}
        assert "sched_switch" in names, names
        assert any(m["comm"].strip() == "pingpong" for m in evs)
        for cpu, hs in g["stats"]["host"].items():
            assert hs["written"] + hs["dropped"] == hs["received"] and hs["written"] % 4096 == 0
    # the second recording asked for timer events too, and got them
    assert any(m["event"].startswith("hrtimer") or m["event"].startswith("timer")
               for m in _events(tmp_path / "out1" / docs[1]["guests"]["rs"]["file"]))
