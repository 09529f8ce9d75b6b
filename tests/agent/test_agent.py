"""The guest agent on this machine's real tracefs, in a private instance.

Every run checks the two things that matter: each page arrives whole, and nothing is
duplicated or missing (events decoded == growth of ``read events`` in per_cpu stats).
The workload is trace_marker writes into the instance (deterministic) plus whatever
sched_switch events the machine makes.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest

from agent_pages import walk
from agentproc import agent, finish
from paths import ROOT
from vmtrace import protocol as P
from vmtrace.format.stream import unpack_stream
from vmtrace.tracefs import Tracefs

pytestmark = pytest.mark.tracefs
def read_events(tf: Tracefs) -> Dict[int, int]:
    return {c: tf.cpu_stats(c).read_events for c in tf.cpus()}


def markers(tf: Tracefs, n: int, size: int = 200, paced: bool = True) -> None:
    """n marker events; paced to a few MB/s so that a reader that keeps up loses none."""
    fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
    try:
        for i in range(n):
            os.write(fd, (b"vmtrace-agent-test %d " % i).ljust(size, b"x"))
            if paced and i % 50 == 49:
                time.sleep(0.002)
    finally:
        os.close(fd)


def check_dir(out: Path, tf: Tracefs, before: Dict[int, int]) -> Dict[int, dict]:
    after = read_events(tf)
    meta = json.loads((out / "metadata" / "meta.json").read_text())
    assert meta["layout"] == "vmtrace-raw" and meta["page_size"] == 4096
    res = {}
    for cpu in tf.cpus():
        r = walk((out / ("cpu%d" % cpu)).read_bytes())
        assert r["events"] == after[cpu] - before[cpu], (cpu, r, after, before)
        assert r["events"] == meta["stats"][str(cpu)]["read_events"]
        assert r["pages"] == meta["stats"][str(cpu)]["pages_sent"]
        res[cpu] = r
    return res


def test_output_dir_whole_pages_nothing_lost_and_decodable(inst, tmp_path):
    out = tmp_path / "raw"
    inst.tracing_on = False  # a full buffer at start would overrun before the first read
    before = read_events(inst)
    p = agent("--instance", inst.instance, "--output-dir", str(out), "--start", "--duration", "2",
              "--flush-interval", "0.3")
    deadline = time.monotonic() + 20
    while not (out / "metadata" / "meta.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    inst.tracing_on = True
    markers(inst, 3000)
    err = finish(p)
    assert "vmtrace-agent: cpus" in err and "lost events" in err and "stopped by duration" in err
    res = check_dir(out, inst, before)
    assert sum(r["events"] for r in res.values()) >= 3000
    meta = json.loads((out / "metadata" / "meta.json").read_text())
    assert sum(s["lost_events"] for s in meta["stats"].values()) == 0, meta["stats"]
    md = out / "metadata"
    for name in ("header_page", "header_event", "saved_cmdlines", "printk_formats", "kallsyms",
                 "events/sched/sched_switch/format", "events/ftrace/print/format"):
        assert (md / name).is_file(), name
    assert (md / "header_page").read_bytes() == inst.header_page()
    # kallsyms travels uncompressed (cheaper for the guest), as the kernel printed it
    addr, kind, _name = (md / "kallsyms").read_bytes().split(b"\n", 1)[0].split()[:3]
    assert len(addr) == 16 and kind in b"AaTtDdBbRrWwVv"
    meta = json.loads((md / "meta.json").read_text())
    assert meta["agent"]["cpu_time_s"] > 0 and meta["instance"] == inst.instance
    # our own decoder reads the directory, event for event
    import vmtrace
    from vmtrace.api import Event

    with vmtrace.open(str(out)) as tr:
        evs = [e for e in tr.events() if isinstance(e, Event)]
    assert len(evs) == sum(r["events"] for r in res.values())
    assert sum(1 for e in evs if e.name == "print" and "vmtrace-agent-test" in str(e.fields)) == 3000


@pytest.mark.oracle
def test_trace_cmd_reads_the_output_wrapped_into_a_tracedat(inst, tmp_path):
    try:
        from vmtrace.format.tracedat_write import write_tracedat
        from vmtrace.format.rawdir import read_rawdir  # noqa: F401
    except ImportError:
        pytest.skip("trace.dat writer not available yet")
    out = tmp_path / "raw"
    p = agent("--instance", inst.instance, "--output-dir", str(out), "--start", "--duration", "1",
              "--no-kallsyms")
    time.sleep(0.3)
    markers(inst, 500)
    finish(p)
    md = {}
    for f in (out / "metadata").rglob("*"):
        if f.is_file():
            md[str(f.relative_to(out / "metadata"))] = f.read_bytes()
    cpus = {c: str(out / ("cpu%d" % c)) for c in inst.cpus()}
    dat = tmp_path / "trace.dat"
    write_tracedat(str(dat), md, cpus)
    rep = subprocess.run(["trace-cmd", "report", "-i", str(dat)], capture_output=True, text=True, timeout=60)
    assert rep.returncode == 0, rep.stderr
    total = sum(walk(Path(f).read_bytes())["events"] for f in cpus.values())
    lines = [ln for ln in rep.stdout.splitlines() if ": " in ln and not ln.startswith("cpus=")]
    assert sum("vmtrace-agent-test" in ln for ln in lines) == 500
    assert len(lines) == total


def test_stdout_stream_unpacks_to_the_raw_layout(inst, tmp_path):
    stream = tmp_path / "stream.bin"
    before = read_events(inst)
    with open(stream, "wb") as f:
        p = agent("--instance", inst.instance, "-o", "--start", "--duration", "1", "--no-kallsyms", stdout=f)
        time.sleep(0.3)
        markers(inst, 1000)
        finish(p)
    out = tmp_path / "raw"
    summary = unpack_stream(str(stream), str(out))
    assert summary["complete"]
    check_dir(out, inst, before)


def _fifo_readers(d: Path, cpus: List[int]) -> Dict[int, bytearray]:
    bufs = {c: bytearray() for c in cpus}

    def reader(cpu: int) -> None:
        with open(d / ("trace-path-cpu%d" % cpu), "rb", buffering=0) as f:
            while True:
                chunk = f.read(1 << 16)
                if not chunk:
                    return
                bufs[cpu] += chunk

    for c in cpus:
        threading.Thread(target=reader, args=(c,), daemon=True).start()
    return bufs


def test_fifo_ports_plain_orders_restart_and_sigint(inst, tmp_path):
    cpus = inst.cpus()
    for c in cpus:
        os.mkfifo(tmp_path / ("trace-path-cpu%d" % c))
    os.mkfifo(tmp_path / "agent-ctl-path")
    before = read_events(inst)
    p = agent("--instance", inst.instance, "--ports", str(tmp_path), "--flush-interval", "0.2")
    bufs = _fifo_readers(tmp_path, cpus)
    ctl = os.open(tmp_path / "agent-ctl-path", os.O_WRONLY)  # as `echo 1 > agent-ctl-path.in`
    try:
        os.write(ctl, b"1\n")
        time.sleep(0.4)
        markers(inst, 300)
        time.sleep(0.5)
        os.write(ctl, b"0\n")
        time.sleep(0.5)
        mid = sum(len(b) for b in bufs.values())
        assert mid > 0
        markers(inst, 300)  # stopped: these wait in the ring buffer
        time.sleep(0.4)
        assert sum(len(b) for b in bufs.values()) == mid
        os.write(ctl, b"hello?\n")  # the seed printed "Invalid host notification"
        os.write(ctl, b"1\n")  # restart after stop
        time.sleep(0.6)
    finally:
        os.close(ctl)
    err = finish(p, signal.SIGINT)
    assert "invalid host notification" in err and "stopped by SIGINT" in err
    after = read_events(inst)
    total = 0
    for c in cpus:
        r = walk(bytes(bufs[c]))
        assert r["events"] == after[c] - before[c]
        total += r["events"]
    assert total >= 600


def _listen(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(path))
    s.listen(1)
    s.settimeout(20)
    return s


class Host:
    """The host side of the framed protocol over a unix socket, for tests."""

    def __init__(self, conn: socket.socket):
        self.conn = conn
        self.dec = P.Decoder(allow_orders=False, source="agent")
        self.items: List = []

    def send(self, data: bytes) -> None:
        self.conn.sendall(data)

    def ask(self, name: str, **fields) -> P.Message:
        self.send(P.encode(P.msg(name, **fields)))
        return self.reply()

    def reply(self, timeout: float = 20) -> P.Message:
        deadline = time.monotonic() + timeout
        while not self.items:
            self.conn.settimeout(max(0.01, deadline - time.monotonic()))
            data = self.conn.recv(1 << 20)
            assert data, "agent closed the control socket"
            self.items.extend(self.dec.feed(data))
        item = self.items.pop(0)
        assert isinstance(item, P.Message), item
        return item


def test_socket_ports_framed_protocol_configure_restore_and_bye(inst, tmp_path):
    cpus = inst.cpus()
    inst.clock = "local"
    orig_events = inst.enabled_events()
    orig_pct = inst.buffer_percent
    listeners = {c: _listen(tmp_path / ("trace-path-cpu%d" % c)) for c in cpus}
    ctl_l = _listen(tmp_path / "agent-ctl-path")
    before = read_events(inst)
    p = agent("--instance", inst.instance, "--ports", str(tmp_path), "--flush-interval", "0.2")
    conns = {c: listeners[c].accept()[0] for c in cpus}
    host = Host(ctl_l.accept()[0])
    bufs = {c: bytearray() for c in cpus}

    def drain(c: int) -> None:
        while True:
            d = conns[c].recv(1 << 16)
            if not d:
                return
            bufs[c] += d

    for c in cpus:
        threading.Thread(target=drain, args=(c,), daemon=True).start()

    hello = host.ask("hello", version=1, id=7)
    assert hello.name == "hello" and hello.get("id") == 7
    assert hello.get("cpus") == cpus and hello.get("page_size") == 4096
    assert "mono" in hello.get("clocks") and hello.get("instance") == inst.instance
    # malformed input: each gets an error, none stops the agent
    host.send(b"\x00garbage line\n")
    assert host.reply().name == "error"
    host.send(P.HEADER.pack(b"VMTR", 1, P.HELLO, 0, 5, 0) + b"{nope")
    assert "does not parse" in host.reply().get("message")
    host.send(P.HEADER.pack(b"VMTR", 1, 77, 0, 2, 0) + b"{}")
    assert "unknown message type" in host.reply().get("message")
    assert "not a request" in host.ask("ok").get("message")
    bad = host.ask("configure", clock="no-such-clock")
    assert bad.name == "error" and "no-such-clock" in bad.get("message")
    assert host.ask("configure", buffer_percent="50").name == "error"
    assert host.ask("time_probe", seq="x").name == "error"
    assert host.ask("hello").name == "hello"

    ok = host.ask("configure", events=["sched:sched_switch", "sched:sched_wakeup"], clock="mono",
                  buffer_percent=25)
    assert ok.name == "ok", ok
    assert inst.clock == "mono" and inst.buffer_percent == 25
    before = read_events(inst)  # a new clock resets the buffer and its counters
    meta = host.ask("metadata", kallsyms=False)
    files = P.unpack_files(meta)
    assert "events/sched/sched_wakeup/format" in files and files["header_event"] == inst.header_event()
    assert json.loads(files["meta.json"])["clock"] == "mono"
    assert host.ask("start").name == "ok"
    assert host.ask("configure", clock="local").name == "error"  # refused while started
    probe = host.ask("time_probe", seq=1, host_ns=123)
    assert probe.get("seq") == 1 and probe.get("clock") == "mono" and probe.get("source") == "CLOCK_MONOTONIC"
    assert probe.get("approximate") is False and probe.get("marker") is True and probe.get("host_ns") == 123
    assert abs(probe.get("guest_ns") - time.clock_gettime_ns(time.CLOCK_MONOTONIC)) < 5e9
    markers(inst, 500)
    time.sleep(0.6)
    st = host.ask("stats")
    assert st.get("running") is True and set(st.get("cpus")) == {str(c) for c in cpus}
    stop = host.ask("stop")
    assert stop.name == "ok" and stop.get("stats")
    bye = host.ask("bye")
    assert bye.name == "bye"
    finish(p)
    # configure's changes were undone at exit
    assert inst.clock == "local" and inst.buffer_percent == orig_pct
    assert inst.enabled_events() == orig_events
    # (restoring the clock reset the counters again, so compare with the agent's own
    # stats, frozen at stop; the other tests check those against tracefs directly)
    for c in cpus:
        got = walk(bytes(bufs[c]))["events"]
        assert got == bye.get("stats")[str(c)]["read_events"] > 0 or got == 0
    print_lines = sum(walk(bytes(b))["events"] for b in bufs.values())
    assert print_lines >= 501  # markers plus the probe's marker


class _Readers:
    """Accepted data connections, each read into a buffer by a thread until EOF."""

    def __init__(self, listeners: Dict[int, socket.socket]):
        self.conns = {c: l.accept()[0] for c, l in listeners.items()}
        self.bufs = {c: bytearray() for c in self.conns}
        self.threads = [threading.Thread(target=self._read, args=(c,), daemon=True) for c in self.conns]
        for t in self.threads:
            t.start()

    def _read(self, c: int) -> None:
        conn = self.conns[c]
        conn.settimeout(None)
        while True:
            try:
                d = conn.recv(1 << 16)
            except OSError:
                return
            if not d:
                return
            self.bufs[c] += d

    def close(self) -> None:
        for conn in self.conns.values():
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            conn.close()


def test_socket_host_goes_away_mid_recording_and_a_new_host_records_again(inst, tmp_path):
    """A recorder killed while tracing: the agent stops, keeps running, reconnects; the
    next host gets hello (not running), may configure again, and receives whole pages."""
    cpus = inst.cpus()
    paths = {c: tmp_path / ("trace-path-cpu%d" % c) for c in cpus}
    ctl_path = tmp_path / "agent-ctl-path"

    def listen_all():
        for path in list(paths.values()) + [ctl_path]:
            if path.exists():
                path.unlink()  # what a new recorder does: rebind over the stale inode
        return {c: _listen(paths[c]) for c in cpus}, _listen(ctl_path)

    data_l, ctl_l = listen_all()
    p = agent("--instance", inst.instance, "--ports", str(tmp_path), "--flush-interval", "0.2",
              "--exit-grace", "1")
    try:
        host = Host(ctl_l.accept()[0])
        first = _Readers(data_l)
        assert host.ask("hello").get("running") is False
        assert host.ask("configure", events=["sched:sched_switch"], buffer_percent=50).name == "ok"
        assert host.ask("start").name == "ok"
        markers(inst, 300)
        time.sleep(0.5)
        # the host vanishes without stop or bye (recorder killed)
        host.conn.close()
        first.close()
        ctl_l.close()
        for l in data_l.values():
            l.close()
        time.sleep(1.0)
        assert p.poll() is None, "the agent exited when the host went away"
        assert inst.read("tracing_on").strip() == "0"  # stopped, settings kept (not restored)
        assert inst.enabled_events() == ["sched:sched_switch"]

        data_l, ctl_l = listen_all()
        host = Host(ctl_l.accept()[0])
        second = _Readers(data_l)
        hello = host.ask("hello")
        assert hello.name == "hello" and hello.get("running") is False
        assert host.ask("configure", events=["sched:sched_switch", "sched:sched_wakeup"]).name == "ok"
        assert host.ask("start").name == "ok"
        markers(inst, 300)
        time.sleep(0.5)
        stop = host.ask("stop")
        assert stop.name == "ok"
        assert host.ask("bye").name == "bye"
        err = finish(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert "the host went away" in err and "a host connected again" in err
    for t in second.threads:
        t.join(10)
    got = {c: walk(bytes(second.bufs[c])) for c in cpus}  # whole, well-formed pages only
    assert sum(r["events"] for r in got.values()) >= 300
    assert sum(len(b) for b in first.bufs.values()) > 0


def test_ports_dir_made_by_prepare_is_used_as_is(inst, tmp_path):
    """--ports on a `vmtrace prepare` FIFO directory: orders from agent-ctl-path.in, pages to
    trace-path-cpuN.out, replies to agent-ctl-path.out, as QEMU's pipe chardev names them."""
    from vmtrace.host.layout import prepare
    from vmtrace.host.transport.fifo import open_link

    cpus = inst.cpus()
    lay = prepare("pp", max(cpus) + 1, str(tmp_path))
    outs = {c: os.open(lay.cpu(c) + ".out", os.O_RDONLY | os.O_NONBLOCK) for c in cpus}
    link = open_link("pp", lay.ctl)
    p = agent("--instance", inst.instance, "--ports", lay.path, "--flush-interval", "0.2")
    try:
        hello = link.call("hello", 20.0)
        assert hello is not None and hello.name == "hello" and hello.get("cpus") == cpus
        assert link.call("start", 10.0).name == "ok"
        markers(inst, 200)
        time.sleep(0.6)
        assert link.call("stop", 10.0).name == "ok"
        got = bytearray()
        for c in cpus:
            while True:
                try:
                    d = os.read(outs[c], 1 << 16)
                except BlockingIOError:
                    break
                if not d:
                    break
                got += d
        assert link.call("bye", 10.0).name == "bye"
        finish(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
        link.close()
        for fd in outs.values():
            os.close(fd)
    assert walk(bytes(got))["events"] >= 200
    assert not any(os.path.islink(os.path.join(lay.path, n)) for n in os.listdir(lay.path))


def test_a_host_that_stops_reading_does_not_hang_the_agent(inst, tmp_path):
    cpus = inst.cpus()
    listeners = {c: _listen(tmp_path / ("trace-path-cpu%d" % c)) for c in cpus}
    p = agent("--instance", inst.instance, "--ports", str(tmp_path), "--start", "--exit-grace", "0.3",
              "-s", "64K", "--flush-interval", "0.2")
    conns = [listeners[c].accept()[0] for c in cpus]  # accepted, never read
    markers(inst, 20000, size=1000, paced=False)  # ~20 MB: far more than socket + pipe + ring buffer
    time.sleep(0.5)
    t0 = time.monotonic()
    err = finish(p, signal.SIGTERM, timeout=30)
    assert time.monotonic() - t0 < 15
    assert "stopped by SIGTERM" in err
    line = [ln for ln in err.splitlines() if ln.startswith("vmtrace-agent: cpus")][0]
    lost = int(line.split(" lost events")[0].rsplit(" ", 1)[1])
    dropped = int(line.split(" pages dropped")[0].rsplit(" ", 1)[1])
    assert lost > 0 or dropped > 0, line
    for c in conns:
        c.close()


def test_bad_arguments_and_missing_ports_give_one_line(inst, tmp_path):
    for args, what in [
        (["-s", "32K"], "between 64K and 1M"),
        (["-s", "2M"], "between 64K and 1M"),
        (["-s", "lots"], "is not a size"),
        (["--ports", str(tmp_path)], "no control port agent-ctl-path"),
        (["--ports", str(tmp_path), "--start"], "no port trace-path-cpu0 for online CPU 0"),
        (["--pump-cpus", "77"], "CPU 77 not online"),
    ]:
        r = subprocess.run([sys.executable, "-m", "vmtrace.agent", "--instance", inst.instance, *args],
                           capture_output=True, text=True, timeout=30,
                           env=dict(os.environ, PYTHONPATH=str(ROOT / "src")))
        assert r.returncode == 2, (args, r.stderr)
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and what in lines[0] and lines[0].startswith("vmtrace-agent: error:"), r.stderr


def test_zipapp_runs_alone_under_python39_with_ctypes_splice(inst, tmp_path):
    """The exported file carries everything; 3.9 has no os.splice, so this is the ctypes path."""
    pyz = tmp_path / "vmtrace-agent.pyz"
    r = subprocess.run([str(ROOT / ".venv/bin/vmtrace"), "agent", "--export", str(pyz)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    py39 = Path("/root/.pyenv/versions/3.9.18/bin/python3.9")
    python = str(py39) if py39.exists() else "/usr/bin/python3"
    out = tmp_path / "raw"
    before = read_events(inst)
    env = {"PATH": "/usr/bin:/bin", "VMTRACE_SPLICE": "ctypes"}  # no venv, no PYTHONPATH
    p = subprocess.Popen([python, "-I", str(pyz), "--instance", inst.instance, "--output-dir", str(out),
                          "--start", "--duration", "1", "--no-kallsyms"],
                         env=env, cwd=str(tmp_path), stderr=subprocess.PIPE)
    time.sleep(0.3)
    markers(inst, 300)
    finish(p)
    check_dir(out, inst, before)
    meta = json.loads((out / "metadata" / "meta.json").read_text())
    assert meta["agent"]["splice"] == "ctypes"
    if py39.exists():
        assert meta["agent"]["python"].startswith("3.9.")


@pytest.mark.tracefs
def test_configure_again_with_the_same_settings_writes_nothing(inst, tmp_path):
    """The host resends a configure that got no answer in time (a starved guest). The
    copy must not disable and re-enable the events, nor reset clock or buffer: each of
    those halts every vCPU or wipes the buffer."""
    from vmtrace.agent.core import Agent, Options

    agent = Agent(Options(instance=inst.instance, output_dir=str(tmp_path / "out")))
    writes: list = []
    real_write = agent.tf.write

    def spy(rel, value, append=False):
        writes.append(rel)
        return real_write(rel, value, append)

    agent.tf.write = spy
    fields = {"events": ["sched", "timer:hrtimer_start"], "clock": "mono", "buffer_size_kb": 1024,
              "buffer_percent": 25}
    agent.configure(fields)
    first = list(writes)
    assert "events/enable" in first and "trace_clock" in first and "buffer_size_kb" in first
    assert set(inst.enabled_events()) == {"%s:%s" % p for p in inst.event_ids(["sched", "timer:hrtimer_start"])}
    del writes[:]
    agent.configure(fields)
    heavy = [w for w in writes if w.endswith("enable") or w in ("trace_clock", "buffer_size_kb")]
    assert heavy == [], writes
    # a different event set is applied in full
    agent.configure({"events": ["sched:sched_switch"]})
    assert inst.enabled_events() == ["sched:sched_switch"]
    agent.tf.write = real_write
    agent.tf.restore(agent.saved)
