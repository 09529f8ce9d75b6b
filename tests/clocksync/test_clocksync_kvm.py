"""The exact KVM TSC method, on constructed data.

KVM guests cannot run on this machine (nested KVM hangs after decompression, see
GUEST-LAB.md), so there is no real debugfs ``kvm/<pid>-<fd>`` tree to read. These tests
build one with the kernel's file names and formats (tsc-offset is printed with %lld,
so negative offsets appear as negative numbers) and construct kvm_write_tsc_offset
events, then check the map inverts KVM's formula exactly.
"""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from vmtrace.clocksync import kvm
from vmtrace.errors import VmtraceError


def guest_tsc(h, offset, ratio, frac):
    return ((h * ratio) >> frac) + offset


def build_debugfs(root, pid, fd, vcpus):
    vm = root / ("%d-%d" % (pid, fd))
    for n, (off, ratio, frac) in vcpus.items():
        d = vm / ("vcpu%d" % n)
        d.mkdir(parents=True)
        (d / "tsc-offset").write_text("%d\n" % off)
        if ratio is not None:
            (d / "tsc-scaling-ratio").write_text("%d\n" % ratio)
        if frac is not None:
            (d / "tsc-scaling-ratio-frac-bits").write_text("%d\n" % frac)
    return vm


def test_reads_debugfs_and_inverts_exactly(tmp_path):
    ratio = int(1.25 * (1 << 48))                 # guest TSC 25 % faster (Intel, 48 bits)
    vm = build_debugfs(tmp_path, 4242, 17, {0: (-123_456_789_000, ratio, 48), 1: (-123_456_789_000, ratio, 48)})
    build_debugfs(tmp_path, 999, 3, {0: (5, None, None)})
    assert [p.rsplit("/", 1)[1] for p in kvm.find_vm_dirs(root=str(tmp_path))] == ["4242-17", "999-3"]
    assert kvm.find_vm_dirs(pid=4242, root=str(tmp_path)) == [str(vm)]
    vcpus = kvm.read_vm(str(vm))
    assert vcpus[0] == kvm.VcpuTsc(-123_456_789_000, ratio, 48)
    cmap = kvm.KvmTscMap(vcpus)
    rng = np.random.default_rng(1)
    hosts = np.sort(rng.integers(10**12, 10**15, 1000))
    g = np.array([guest_tsc(int(h), -123_456_789_000, ratio, 48) for h in hosts])
    back = cmap.to_host(g, np.zeros(len(g), dtype=np.int64))
    # exact: mapping back and forward again gives the same guest TSC, to the cycle
    again = [guest_tsc(int(h), -123_456_789_000, ratio, 48) for h in back]
    assert again == g.tolist()
    assert np.all(np.abs(back - hosts) <= 1)


def test_missing_scaling_files_mean_no_scaling(tmp_path):
    vm = build_debugfs(tmp_path, 1, 2, {0: (1000, None, None)})
    v = kvm.read_vm(str(vm), default_frac_bits=kvm.AMD_FRAC_BITS)
    assert v[0].ratio == 1 << 32
    cmap = kvm.KvmTscMap(v)
    assert cmap.to_host(np.array([5000]))[0] == 4000


def test_offset_changes_from_kvm_write_tsc_offset_events():
    # vCPU 0 starts with offset A; at host TSC 5e9 KVM writes B (e.g. after the guest
    # wrote its TSC); vCPU 1 keeps offset A throughout.
    A, B = -3 * 10**9, -10**9      # the guest TSC jumps forward by 2e9 at the write
    evs = [SimpleNamespace(ts=5 * 10**9, name="kvm_write_tsc_offset",
                           fields={"vcpu_id": 0, "previous_tsc_offset": A % (1 << 64),
                                   "next_tsc_offset": B % (1 << 64)}),
           SimpleNamespace(ts=6 * 10**9, name="sched_switch", fields={})]
    changes = kvm.offset_changes(evs)
    assert changes == [kvm.OffsetChange(5 * 10**9, 0, A, B)]
    # debugfs read at the end shows the current offset B for vCPU 0
    cmap = kvm.KvmTscMap({0: kvm.VcpuTsc(B, 1 << 48, 48), 1: kvm.VcpuTsc(A, 1 << 48, 48)}, changes)
    hosts = [2 * 10**9, 4_999_999_999, 5 * 10**9, 8 * 10**9]
    g0 = [h + A if h < 5 * 10**9 else h + B for h in hosts]
    assert cmap.to_host(np.array(g0), np.zeros(4, dtype=np.int64)).tolist() == hosts
    g1 = [h + A for h in hosts]
    assert cmap.to_host(np.array(g1), np.ones(4, dtype=np.int64)).tolist() == hosts


def test_backward_offset_write_prefers_the_later_segment():
    # A write that moves the guest TSC back makes guest values that were read both
    # before and after it; with no other information the later reading is assumed.
    A, B = -10**9, -3 * 10**9
    changes = [kvm.OffsetChange(5 * 10**9, 0, A, B)]
    cmap = kvm.KvmTscMap({0: kvm.VcpuTsc(B, 1 << 48, 48)}, changes)
    assert cmap.to_host(np.array([3 * 10**9]))[0] == 6 * 10**9     # ambiguous: later wins
    assert cmap.to_host(np.array([1 * 10**9]))[0] == 2 * 10**9     # only before the write


def test_to_nanoseconds_and_from_session():
    cfg = {"method": "kvm", "vcpus": {"0": {"offset": -1000, "ratio": 1 << 48, "frac_bits": 48}},
           "tsc_khz": 2_000_000.0, "anchor": [10_000, 5_000_000]}
    cmap = kvm.from_session(cfg)
    # guest 21000 -> host TSC 22000 -> 12000 cycles after the anchor at 2 GHz = 6000 ns
    assert cmap.to_host(np.array([21_000]), np.array([0]))[0] == 5_006_000
    assert cmap.shifted(7).to_host(np.array([21_000]), np.array([0]))[0] == 5_006_007


def test_bad_input(tmp_path):
    with pytest.raises(VmtraceError, match="cannot list"):
        kvm.find_vm_dirs(root=str(tmp_path / "nope"))
    (tmp_path / "1-1").mkdir()
    with pytest.raises(VmtraceError, match="no vcpuN"):
        kvm.read_vm(str(tmp_path / "1-1"))
    d = tmp_path / "1-1" / "vcpu0"
    d.mkdir()
    (d / "tsc-offset").write_text("zz\n")
    with pytest.raises(VmtraceError, match="not a number"):
        kvm.read_vm(str(tmp_path / "1-1"))
    with pytest.raises(VmtraceError, match="bad kvm sync"):
        kvm.from_session({"method": "kvm"})
    cmap = kvm.KvmTscMap({0: kvm.VcpuTsc(0, 1 << 48, 48), 1: kvm.VcpuTsc(0, 1 << 48, 48)})
    with pytest.raises(VmtraceError, match="vCPU 3"):
        cmap.to_host(np.array([1]), np.array([3]))
    with pytest.raises(VmtraceError, match="each event's vCPU"):
        cmap.to_host(np.array([1]))
