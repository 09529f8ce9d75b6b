"""What the host must record to put a TCG guest on its clock to the microsecond.

When a recording has host events (``--host-events``) and a guest is a QEMU TCG x86 guest
on this machine, the recorder:

* finds the guest's QEMU process (the one whose command line names the guest's port
  directory) and maps each vCPU to the host thread that runs it: QMP
  ``query-cpus-fast`` when QEMU has a ``-qmp unix:`` socket, else the thread names
  QEMU gives with ``-name ...,debug-threads=on`` (``CPU n/TCG`` per vCPU with
  ``thread=multi``, ``ALL CPUs/TCG`` with one thread for all);
* asks the guest to trace with ``x86-tsc`` (under TCG that is the host's TSC plus a
  constant while the VM runs: docs/timeline.md) and adds the cheap events the sync
  uses (``power:cpu_idle``, interrupt entries) to the guest's events;
* records, in a tracefs instance of its own on the host's ``x86-tsc`` clock, only the
  ``sched_switch`` events that switch one of those threads in or out and their
  ``sched_wakeup``s (kernel-side filters on the thread ids), kept as the kernel's text
  in ``host-vcpus.txt``; and writes ``vmtrace-anchor seq=N`` markers into it between two
  CLOCK_MONOTONIC readings, ten a second, which tie the host's TSC to the session's
  clock (``anchors`` in session.json).

The host's own ``host.dat`` stays on ``mono``: everything else in a session (probes,
orders, the merged timeline) is CLOCK_MONOTONIC, and the anchors cost a few
microseconds of bound where switching the host's clock would change every consumer.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from typing import Any, Dict, List, Optional, Tuple

from vmtrace.errors import VmtraceError

SYNC_FILE = "host-vcpus.txt"
GUEST_SYNC_EVENTS = ("power:cpu_idle", "irq_vectors:local_timer_entry", "irq:irq_handler_entry")
ANCHOR_PERIOD_S = 0.1
ANCHOR_TRIES = 4
BUFFER_KB = 4096
MAX_FILE = 512 << 20            # the text file's ceiling (~3 h of an idle 2-vCPU guest)
MAX_CMDLINE = 1 << 16
MAX_QMP = 1 << 20
_CPU_COMM = re.compile(r"^CPU (\d{1,4})/(TCG|KVM)$")


# -- finding QEMU and its vCPU threads --------------------------------------------------
def _cmdline(pid: int, proc: str = "/proc") -> List[str]:
    try:
        with open("%s/%d/cmdline" % (proc, pid), "rb") as f:
            raw = f.read(MAX_CMDLINE)
    except OSError:
        return []
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def find_qemu(port_dir: str, proc: str = "/proc") -> Optional[int]:
    """The QEMU process whose command line names ``port_dir`` (the guest's prepared
    ports), or None."""
    port_dir = os.path.abspath(port_dir)
    try:
        names = os.listdir(proc)
    except OSError:
        return None
    for n in names:
        if not n.isdigit():
            continue
        argv = _cmdline(int(n), proc)
        if argv and "qemu-system" in os.path.basename(argv[0]) and any(port_dir in a for a in argv):
            return int(n)
    return None


def qemu_facts(argv: List[str]) -> Dict[str, Any]:
    """Accelerator, architecture and QMP socket from QEMU's command line."""
    joined = " ".join(argv)
    accel = "kvm" if ("-enable-kvm" in argv or re.search(r"accel[= ]kvm|-accel kvm", joined)) else "tcg"
    arch = "x86" if re.search(r"qemu-system-(x86_64|i386)$", argv[0] if argv else "") else "other"
    qmp = None
    for i, a in enumerate(argv):
        if a in ("-qmp", "--qmp") and i + 1 < len(argv) and argv[i + 1].startswith("unix:"):
            qmp = argv[i + 1][5:].split(",")[0]
    return {"accel": accel, "arch": arch, "qmp": qmp}


def qmp_cpus(path: str, timeout: float = 3.0) -> Dict[int, int]:
    """cpu-index -> thread-id from QMP ``query-cpus-fast``."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    buf = b""

    def reply() -> dict:
        nonlocal buf
        while True:
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                msg = json.loads(line)
                if isinstance(msg, dict) and ("return" in msg or "error" in msg or "QMP" in msg):
                    return msg
            chunk = s.recv(65536)
            if not chunk or len(buf) > MAX_QMP:
                raise VmtraceError("QMP %s: connection closed or reply too long" % path)
            buf += chunk

    try:
        s.connect(path)
        reply()
        s.sendall(b'{"execute": "qmp_capabilities"}\n')
        reply()
        s.sendall(b'{"execute": "query-cpus-fast"}\n')
        msg = reply()
    except (OSError, ValueError) as exc:
        raise VmtraceError("QMP %s: %s" % (path, exc)) from None
    finally:
        s.close()
    out = {}
    for c in msg.get("return") or []:
        if isinstance(c, dict) and type(c.get("cpu-index")) is int and type(c.get("thread-id")) is int:
            out[c["cpu-index"]] = c["thread-id"]
    return out


def proc_cpus(pid: int, ncpus: int, proc: str = "/proc") -> Dict[int, int]:
    """cpu -> thread from QEMU's thread names (``-name X,debug-threads=on``)."""
    out: Dict[int, int] = {}
    single = None
    try:
        tasks = os.listdir("%s/%d/task" % (proc, pid))
    except OSError:
        return out
    for t in tasks:
        try:
            with open("%s/%d/task/%s/comm" % (proc, pid, t)) as f:
                comm = f.read(64).strip()
        except OSError:
            continue
        m = _CPU_COMM.match(comm)
        if m:
            out[int(m.group(1))] = int(t)
        elif comm == "ALL CPUs/TCG":
            single = int(t)
    if not out and single is not None:
        out = {c: single for c in range(ncpus)}
    return out


def plan(port_dir: str, ncpus: int, proc: str = "/proc", debugfs: Optional[str] = None) -> Tuple[Optional[Dict[str, Any]], str]:
    """The sync plan for one guest, or (None, why not). A TCG x86 guest gets the tcg
    method; a KVM guest the kvm method (its VM's debugfs directory, read at the end)."""
    from vmtrace.clocksync import kvm

    pid = find_qemu(port_dir, proc)
    if pid is None:
        return None, "no QEMU process on this host names %s" % port_dir
    facts = qemu_facts(_cmdline(pid, proc))
    if facts["arch"] != "x86":
        return None, "QEMU %d is not an x86 guest" % pid
    threads, how = {}, ""
    if facts["qmp"]:
        try:
            threads, how = qmp_cpus(facts["qmp"]), "qmp query-cpus-fast"
        except VmtraceError:
            threads = {}
    if not threads:
        threads, how = proc_cpus(pid, ncpus, proc), "/proc comm"
    if facts["accel"] == "kvm":
        try:
            dirs = kvm.find_vm_dirs(pid, debugfs or kvm.KVM_DEBUGFS)
        except VmtraceError as exc:
            return None, "KVM guest, but %s" % exc
        if len(dirs) != 1:
            return None, "KVM guest, but %d debugfs directories for QEMU %d" % (len(dirs), pid)
        out: Dict[str, Any] = {"method": "kvm", "qemu_pid": pid, "kvm_dir": dirs[0]}
        if threads:
            out.update(vcpu_threads={str(k): v for k, v in sorted(threads.items())}, vcpu_map_from=how)
        return out, ""
    if not threads:
        return None, ("cannot tell QEMU %d's vCPU threads apart (give QEMU -qmp unix:PATH,server=on,wait=off "
                      "or -name NAME,debug-threads=on)" % pid)
    return {"method": "tcg", "qemu_pid": pid, "vcpu_threads": {str(k): v for k, v in sorted(threads.items())},
            "vcpu_map_from": how}, ""


_KVM_TSC = re.compile(r"kvm_write_tsc_offset: vcpu[= ](\d{1,5}),? prev[= ](\d{1,20}),? next[= ](\d{1,20})")


def kvm_section(plan: Dict[str, Any], record: Dict[str, Any], text_path: Optional[str]) -> Dict[str, Any]:
    """session.json's ``sync`` for a KVM guest (clocksync/kvm.py ``from_session``): the
    offsets and scalings in debugfs at the end, the ``kvm_write_tsc_offset`` changes the
    host instance saw (host TSC), and the host TSC -> CLOCK_MONOTONIC line from the
    anchors (the host's trace.dat is on ``mono``)."""
    from vmtrace.clocksync import hostsched, kvm

    vcpus = kvm.read_vm(plan["kvm_dir"])
    out = {k: v for k, v in plan.items() if k != "kvm_dir"}
    out.update(record)
    out["vcpus"] = {str(n): {"offset": v.offset, "ratio": v.ratio, "frac_bits": v.frac_bits}
                    for n, v in sorted(vcpus.items())}
    changes, stamps = [], {}
    if text_path and os.path.exists(text_path):
        with open(text_path, errors="replace") as f:
            for line in f:
                m = _KVM_TSC.search(line)
                if m:
                    ts = re.search(r"\s(\d{1,20}): kvm_write_tsc_offset", line)
                    if ts:
                        changes.append([int(ts.group(1)), int(m.group(1)), _signed(int(m.group(2))),
                                        _signed(int(m.group(3)))])
        stamps = hostsched.read(text_path, []).anchors
    out["changes"] = sorted(changes)
    pts = [((lo + hi) // 2, stamps[seq]) for seq, lo, hi in record.get("anchors", []) if seq in stamps]
    if len(pts) >= 2 and pts[-1][1] > pts[0][1] and pts[-1][0] > pts[0][0]:
        (n0, t0), (n1, t1) = pts[0], pts[-1]
        out["anchor"] = [t0, n0]
        out["tsc_khz"] = (t1 - t0) / (n1 - n0) * 1e6
    else:
        out.setdefault("problems", []).append("no TSC anchors: host TSC cannot be put on the host's clock")
    return out


def _signed(v: int) -> int:
    v %= 1 << 64
    return v - (1 << 64) if v >= 1 << 63 else v


# -- the host-side record -------------------------------------------------------------------
def _filters(tids: List[int]) -> Tuple[str, str]:
    sw = "||".join("prev_pid==%d||next_pid==%d" % (t, t) for t in tids)
    wk = "||".join("pid==%d||common_pid==%d" % (t, t) for t in tids)
    return sw, wk


class VcpuRecord:
    """The host tracefs instance recording the vCPU threads, and its anchors."""

    def __init__(self, outdir: str, tids: List[int], kvm_tids: Optional[List[int]] = None):
        from vmtrace.tracefs import Tracefs

        self.path = os.path.join(outdir, SYNC_FILE)
        self.tids = sorted(set(tids))
        self.kvm_tids = sorted(set(kvm_tids or []))
        self.tf = Tracefs.create_instance("vmtrace-sync-%d" % os.getpid(), exist_ok=False)
        self.anchors: List[List[int]] = []
        self.problems: List[str] = []
        self._stop = threading.Event()
        self._out = None
        self._reader: Optional[threading.Thread] = None
        self._anchorer: Optional[threading.Thread] = None
        self._seq = 0
        self._written = 0
        self._marker_fd = -1
        self._pipe_fd = -1

    def start(self) -> None:
        tf = self.tf
        try:
            tf.tracing_on = False
            if "x86-tsc" not in tf.clocks:
                raise VmtraceError("the host offers no x86-tsc trace clock")
            tf.clock = "x86-tsc"
            tf.buffer_size_kb = BUFFER_KB
            if self.tids:
                sw, wk = _filters(self.tids)
                tf.write("events/sched/sched_switch/filter", sw)
                tf.write("events/sched/sched_wakeup/filter", wk)
                tf.enable_events(["sched:sched_switch", "sched:sched_wakeup"])
            if self.kvm_tids:
                # offset writes of these VMs' vCPU threads (KVM writes it from the vCPU's ioctl)
                tf.write("events/kvm/kvm_write_tsc_offset/filter",
                         "||".join("common_pid==%d" % t for t in self.kvm_tids))
                tf.enable_events(["kvm:kvm_write_tsc_offset"])
            self._out = open(self.path, "w")
            self._pipe_fd = os.open(tf.file("trace_pipe"), os.O_RDONLY | os.O_NONBLOCK)
            self._marker_fd = os.open(tf.file("trace_marker"), os.O_WRONLY)
            tf.tracing_on = True
        except (OSError, VmtraceError):
            self.close()
            raise
        self._reader = threading.Thread(target=self._read, name="vmtrace-vcpusync", daemon=True)
        self._reader.start()
        self._anchorer = threading.Thread(target=self._anchor_loop, name="vmtrace-anchors", daemon=True)
        self._anchorer.start()

    def anchor(self, tries: int = ANCHOR_TRIES) -> None:
        """One anchor: CLOCK_MONOTONIC, a marker stamped with the host TSC, CLOCK_MONOTONIC.
        The quickest of a few tries is kept (a preempted try has a long round trip;
        the markers of the others stay in the file, unreferenced)."""
        best = None
        for _ in range(tries):
            self._seq += 1
            msg = b"vmtrace-anchor seq=%d" % self._seq
            t1 = time.monotonic_ns()
            os.write(self._marker_fd, msg)
            t2 = time.monotonic_ns()
            if best is None or t2 - t1 < best[2] - best[1]:
                best = [self._seq, t1, t2]
        self.anchors.append(best)

    def _anchor_loop(self) -> None:
        while not self._stop.wait(ANCHOR_PERIOD_S):
            try:
                self.anchor()
            except OSError as exc:
                self.problems.append("anchor marker: %s" % exc.strerror)
                return

    def _drain(self) -> bool:
        got = False
        while True:
            try:
                chunk = os.read(self._pipe_fd, 1 << 16)
            except BlockingIOError:
                return got
            if not chunk:
                return got
            got = True
            if self._written + len(chunk) > MAX_FILE:
                if not self.problems or "ceiling" not in self.problems[-1]:
                    self.problems.append("host vCPU record reached its %d-byte ceiling; later records dropped" % MAX_FILE)
                continue
            self._written += len(chunk)
            self._out.write(chunk.decode("utf-8", "replace"))

    def _read(self) -> None:
        while not self._stop.is_set():
            if not self._drain():
                time.sleep(0.05)

    def stop(self) -> Dict[str, Any]:
        """End the record; returns what session.json keeps (file, anchors, problems)."""
        try:
            self.anchor()
        except OSError:
            pass
        self._stop.set()
        for t in (self._anchorer, self._reader):
            if t is not None:
                t.join(5)
        try:
            self.tf.tracing_on = False
            self._drain()
            lost = sum(self.tf.cpu_stats(c).overrun for c in self.tf.cpus())
            if lost:
                self.problems.append("host vCPU record: %d events overwritten" % lost)
        except (OSError, VmtraceError, AttributeError) as exc:
            self.problems.append("host vCPU record: %s" % exc)
        self.close()
        return {"file": SYNC_FILE, "clock": "x86-tsc", "anchors": self.anchors, "problems": self.problems}

    def close(self) -> None:
        for fd in (self._pipe_fd, self._marker_fd):
            if fd >= 0:
                os.close(fd)
        self._pipe_fd = self._marker_fd = -1
        if self._out is not None:
            self._out.close()
            self._out = None
        try:
            self.tf.remove()
        except (OSError, VmtraceError):
            pass
