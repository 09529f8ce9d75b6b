"""A real two-clock session on this machine, and the merge and check proved on it.

No guest runs here before the TCG lab lands, so the "guest" is a second tracefs
instance that traces with another clock (``tai``, about 1.8e18 ns away from ``mono``).
The host side traces with ``mono`` in its own instance. Probes follow the protocol: the
host reads CLOCK_MONOTONIC, the "agent" reads the guest's clock (CLOCK_TAI, exactly the
trace clock ``tai``) and writes ``vmtrace-probe seq=N`` to the guest instance's
trace_marker, the host reads CLOCK_MONOTONIC again. Both instances are extracted to
trace.dat with trace-cmd, so every timestamp here is a real kernel trace timestamp.

Many test modules build their sessions with :func:`make_pseudo_session`.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Iterable, NamedTuple

import realtrace
from vmtrace import session as merge
from vmtrace.tracefs import Tracefs


CLOCK_IDS = {"tai": time.CLOCK_TAI, "boot": time.CLOCK_BOOTTIME, "mono": time.CLOCK_MONOTONIC}
EVENTS = ["sched:sched_switch", "sched:sched_wakeup", "sched:sched_waking", "sched:sched_process_exec"]
WORKLOAD = "for i in $(seq 60); do ls / >/dev/null; echo $i | cat >/dev/null; sleep 0.003; done"


class Ev(NamedTuple):
    ts: int
    cpu: int
    pid: int
    comm: str
    system: str
    event: str
    fields: dict


_LINE = re.compile(r"^\s*(?P<comm>.*)-(?P<pid>\d+)\s+\[(?P<cpu>\d+)\]\s+(?P<sec>\d+)\.(?P<nsec>\d{9}):\s+"
                   r"(?P<event>[\w]+):\s*(?P<rest>.*)$")
_FIELD = re.compile(r"(\w+)=(.*?)(?=\s+\w+=|$)")


def tracecmd_events(path: str) -> Iterable[Ev]:
    """Read a trace.dat with the oracle (`trace-cmd report -t -R`), for use until the
    project's own decoder (vmtrace.api) is available."""
    text = realtrace.trace_cmd_report(Path(path), "-t", "-R")
    for line in text.splitlines():
        if line.startswith("cpus=") or not line.strip():
            continue
        if ":" in line.split()[0] and line.startswith("vmtrace-"):
            line = line.split(":", 1)[1]          # instance prefix from extract -B
        m = _LINE.match(line)
        if not m:
            continue
        rest = m["rest"]
        if m["event"] == "print":
            ip, _, buf = rest.partition(" buf=")
            fields = {"ip": ip.replace("ip=", ""), "buf": buf}
        else:
            fields = {k: v.strip() for k, v in _FIELD.findall(rest)}
        yield Ev(int(m["sec"]) * 1_000_000_000 + int(m["nsec"]), int(m["cpu"]), int(m["pid"]),
                 m["comm"].strip(), "", m["event"], fields)


def reader(path: str):
    """The project's decoder when it exists, else the oracle's text output."""
    try:
        import vmtrace.api  # noqa: F401
    except ImportError:
        return tracecmd_events(path)
    return merge.default_reader(path)


def _marker(tf: Tracefs, text: str) -> None:
    fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def make_pseudo_session(out: Path, guest_clock: str = "tai", n_probes: int = 40,
                        name: str = "guest1") -> Path:
    out.mkdir(parents=True, exist_ok=True)
    tag = "%d-%d" % (os.getpid(), time.monotonic_ns() % 1_000_000)
    g = Tracefs.create_instance("vmtrace-test-psg-" + tag)
    h = Tracefs.create_instance("vmtrace-test-psh-" + tag)
    gclk = CLOCK_IDS[guest_clock]
    mono = time.CLOCK_MONOTONIC
    probes, orders = [], []
    try:
        for tf, clock in ((g, guest_clock), (h, "mono")):
            tf.tracing_on = False
            tf.buffer_size_kb = 8192   # the machine is busy: others trace and build too
            tf.clock = clock
            tf.enable_events(EVENTS)
            # Only this process and its children: other engineers' event-heavy runs on
            # this machine would otherwise overflow the buffers and drop our markers.
            tf.write("set_event_pid", str(os.getpid()))
            tf.write("options/event-fork", "1")
            tf.clear()
        h.tracing_on = True
        wl = subprocess.Popen(["sh", "-c", WORKLOAD], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        s = time.clock_gettime_ns(mono)
        g.tracing_on = True
        _marker(g, "vmtrace-order kind=start")
        orders.append(["start", s, time.clock_gettime_ns(mono)])
        for seq in range(1, n_probes + 1):
            s = time.clock_gettime_ns(mono)
            gv = time.clock_gettime_ns(gclk)
            _marker(g, "vmtrace-probe seq=%d" % seq)
            r = time.clock_gettime_ns(mono)
            probes.append([s, gv, r, seq])
            time.sleep(0.004)
        wl.wait(timeout=60)
        s = time.clock_gettime_ns(mono)
        _marker(g, "vmtrace-order kind=stop")
        g.tracing_on = False
        orders.append(["stop", s, time.clock_gettime_ns(mono)])
        h.tracing_on = False
        for tf, fname in ((g, name + ".dat"), (h, "host.dat")):
            subprocess.run(["trace-cmd", "extract", "-B", tf.instance, "-o", str(out / fname)], check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    finally:
        g.remove()
        h.remove()
    meta = {"layout": "vmtrace-session", "version": 1,
            "guests": {name: {"file": name + ".dat", "clock": guest_clock, "cpus": os.cpu_count(),
                              "stats": {}, "probes": probes, "orders": orders}},
            "host": {"file": "host.dat", "clock": "mono"}}
    (out / "session.json").write_text(json.dumps(meta, indent=1))
    return out
