"""The recorder's sync plan (host/vcpusync.py) on constructed /proc and debugfs trees.

A real TCG guest's plan is exercised end to end by tests/test_e2e_tcgsync.py (QMP). The
constructed trees cover what cannot run here: the /proc thread-name fallback without
QMP, and KVM guests (nested KVM does not run on this machine), whose debugfs TSC
offsets/scalings and kvm_write_tsc_offset records must become a session.json section
that clocksync/kvm.py maps cycle-exactly."""
import numpy as np
import pytest

from vmtrace.clocksync import kvm
from vmtrace.host import vcpusync


def _proc(tmp_path, pid, argv, threads):
    d = tmp_path / "proc" / str(pid)
    (d / "task").mkdir(parents=True)
    (d / "cmdline").write_bytes(b"\0".join(a.encode() for a in argv) + b"\0")
    for tid, comm in threads.items():
        (d / "task" / str(tid)).mkdir()
        (d / "task" / str(tid) / "comm").write_text(comm + "\n")
    (tmp_path / "proc" / "self").mkdir(exist_ok=True)
    return str(tmp_path / "proc")


def test_tcg_plan_from_thread_names(tmp_path):
    ports = str(tmp_path / "guests" / "g1")
    proc = _proc(tmp_path, 4242, ["/usr/bin/qemu-system-x86_64", "-accel", "tcg,thread=multi",
                                  "-chardev", "pipe,id=c,path=%s/ctl" % ports, "-name", "g1,debug-threads=on"],
                 {4242: "qemu-system-x86", 4250: "CPU 0/TCG", 4251: "CPU 1/TCG", 4249: "IO mon_iothread"})
    plan, why = vcpusync.plan(ports, 2, proc=proc)
    assert why == "" and plan["method"] == "tcg" and plan["qemu_pid"] == 4242
    assert plan["vcpu_threads"] == {"0": 4250, "1": 4251} and plan["vcpu_map_from"] == "/proc comm"


def test_tcg_single_thread_and_unnamed_threads(tmp_path):
    ports = str(tmp_path / "p")
    proc = _proc(tmp_path, 7, ["qemu-system-x86_64", "-chardev", "socket,path=%s/x" % ports],
                 {7: "qemu-system-x86", 8: "ALL CPUs/TCG"})
    plan, _ = vcpusync.plan(ports, 2, proc=proc)
    assert plan["vcpu_threads"] == {"0": 8, "1": 8}
    proc2 = _proc(tmp_path / "b", 9, ["qemu-system-x86_64", "-chardev", "socket,path=%s/x" % ports],
                  {9: "qemu-system-x86", 10: "qemu-system-x86"})
    plan, why = vcpusync.plan(ports, 2, proc=proc2)
    assert plan is None and "debug-threads" in why
    plan, why = vcpusync.plan(str(tmp_path / "elsewhere"), 2, proc=proc)
    assert plan is None and "no QEMU" in why


def _debugfs(tmp_path, pid, vcpus):
    root = tmp_path / "kvm"
    for n, (off, ratio, frac) in vcpus.items():
        d = root / ("%d-11" % pid) / ("vcpu%d" % n)
        d.mkdir(parents=True)
        (d / "tsc-offset").write_text("%d\n" % off)
        (d / "tsc-scaling-ratio").write_text("%d\n" % ratio)
        (d / "tsc-scaling-ratio-frac-bits").write_text("%d\n" % frac)
    return str(root)


def test_kvm_plan_and_session_section_map_exactly(tmp_path):
    ports = str(tmp_path / "guests" / "k")
    proc = _proc(tmp_path, 500, ["qemu-system-x86_64", "-accel", "kvm", "-chardev", "pipe,path=%s/c" % ports],
                 {500: "qemu-system-x86", 501: "CPU 0/KVM"})
    ratio = (1 << 48) * 3 // 2                      # guest TSC runs 1.5x the host's
    root = _debugfs(tmp_path, 500, {0: (-1_000_000, ratio, 48)})
    plan, why = vcpusync.plan(ports, 1, proc=proc, debugfs=root)
    assert why == "" and plan["method"] == "kvm" and plan["vcpu_threads"] == {"0": 501}
    # the host record: two anchors and one offset write at host TSC 5_000_000
    text = tmp_path / "host-vcpus.txt"
    text.write_text(
        "  python-9 [000] ..... 1000000: tracing_mark_write: vmtrace-anchor seq=1\n"
        "  CPU 0/KVM-501 [001] ..... 5000000: kvm_write_tsc_offset: vcpu=0 prev=18446744073708551616 next=18446744073707551616\n"
        "  python-9 [000] ..... 27000000: tracing_mark_write: vmtrace-anchor seq=2\n")
    record = {"file": "host-vcpus.txt", "clock": "x86-tsc", "problems": [],
              "anchors": [[1, 999_990, 1_000_010], [2, 10_999_990, 11_000_010]]}   # 2.6 cycles per ns
    sec = vcpusync.kvm_section(plan, record, str(text))
    assert sec["method"] == "kvm" and "kvm_dir" not in sec
    assert sec["changes"] == [[5_000_000, 0, -1_000_000, -2_000_000]]
    assert sec["anchor"] == [1_000_000, 1_000_000] and abs(sec["tsc_khz"] - 2_600_000) < 1e-6
    cmap = kvm.from_session(sec)
    # a guest TSC read after the write: host = ((g - next) << 48) / ratio, then to ns
    h = 20_000_000
    g = ((h * ratio) >> 48) - 2_000_000
    assert cmap.to_host(np.array([g]), np.array([0]))[0] == 1_000_000 + round((h - 1_000_000) / 2.6)


def test_kvm_plan_without_debugfs_says_why(tmp_path):
    ports = str(tmp_path / "p")
    proc = _proc(tmp_path, 600, ["qemu-system-x86_64", "-enable-kvm", "-chardev", "pipe,path=%s/c" % ports], {})
    plan, why = vcpusync.plan(ports, 1, proc=proc, debugfs=str(tmp_path / "nodebugfs"))
    assert plan is None and "KVM guest" in why
