"""The exact guest->host map for KVM guests that trace with ``x86-tsc``.

Under KVM the guest's TSC is the host's TSC, scaled and offset by values KVM programs
into the vCPU::

    guest_tsc = ((host_tsc * ratio) >> frac_bits) + offset

KVM shows ``offset`` and ``ratio`` per vCPU in debugfs
(``/sys/kernel/debug/kvm/<pid>-<fd>/vcpuN/tsc-offset``, ``tsc-scaling-ratio``, and on
newer kernels ``tsc-scaling-ratio-frac-bits``; 48 bits on Intel, 32 on AMD), and every
change of offset is a host trace event ``kvm:kvm_write_tsc_offset`` (vcpu_id,
previous_tsc_offset, next_tsc_offset) stamped on the host's clock. With both, each
guest TSC value maps back to the host TSC without any estimation error; what remains
is converting host TSC to the host's trace clock, which is a separate (linear) step
given by ``host_tsc_to_ns`` (identity when the host also traces with ``x86-tsc``).

No KVM guest can run on the development machine (nested KVM hangs), so this module is
tested on constructed debugfs trees and constructed offset-change events.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np

from vmtrace.errors import VmtraceError

KVM_DEBUGFS = "/sys/kernel/debug/kvm"
INTEL_FRAC_BITS = 48
AMD_FRAC_BITS = 32
_VM_DIR = re.compile(r"^(\d+)-(\d+)\Z")
_VCPU_KEY = re.compile(r"^[0-9]{1,5}\Z")
_U64 = 1 << 64


@dataclass
class VcpuTsc:
    offset: int          # signed: debugfs prints it as %lld
    ratio: int
    frac_bits: int


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip(), 0)
    except OSError as exc:
        raise VmtraceError("cannot read %s: %s" % (path, exc.strerror))
    except ValueError:
        raise VmtraceError("%s: not a number" % path)


def find_vm_dirs(pid: Optional[int] = None, root: str = KVM_DEBUGFS) -> List[str]:
    """The ``<pid>-<fd>`` directories of running VMs (of QEMU process ``pid`` if given)."""
    try:
        names = os.listdir(root)
    except OSError as exc:
        raise VmtraceError("cannot list %s: %s (is debugfs mounted and KVM in use?)" % (root, exc.strerror))
    out = []
    for n in sorted(names):
        m = _VM_DIR.match(n)
        if m and (pid is None or int(m.group(1)) == pid):
            out.append(os.path.join(root, n))
    return out


def read_vm(vm_dir: str, default_frac_bits: int = INTEL_FRAC_BITS) -> Dict[int, VcpuTsc]:
    """Read every vCPU's TSC offset and scaling from one VM's debugfs directory."""
    out: Dict[int, VcpuTsc] = {}
    try:
        names = os.listdir(vm_dir)
    except OSError as exc:
        raise VmtraceError("cannot list %s: %s" % (vm_dir, exc.strerror))
    for n in names:
        if not (n.startswith("vcpu") and _VCPU_KEY.match(n[4:])):
            continue
        d = os.path.join(vm_dir, n)
        off = _read_int(os.path.join(d, "tsc-offset"))
        if off >= 1 << 63:
            off -= _U64
        ratio_path = os.path.join(d, "tsc-scaling-ratio")
        frac_path = os.path.join(d, "tsc-scaling-ratio-frac-bits")
        frac = _read_int(frac_path) if os.path.exists(frac_path) else default_frac_bits
        ratio = _read_int(ratio_path) if os.path.exists(ratio_path) else 1 << frac
        if ratio <= 0:
            raise VmtraceError("%s: TSC scaling ratio must be positive" % ratio_path)
        out[int(n[4:])] = VcpuTsc(off, ratio, frac)
    if not out:
        raise VmtraceError("%s has no vcpuN directories" % vm_dir)
    return out


@dataclass
class OffsetChange:
    """A ``kvm_write_tsc_offset`` event: from host TSC ``host_tsc`` on, ``vcpu`` uses ``next``."""

    host_tsc: int
    vcpu: int
    previous: int
    next: int


def offset_changes(events: Iterable) -> List[OffsetChange]:
    """Pick ``kvm_write_tsc_offset`` events out of host events (objects with ``ts``, a
    ``name`` or ``event`` and ``fields``); their ts must be on the host TSC."""
    out = []
    for e in events:
        name = getattr(e, "event", None) or getattr(e, "name", None)
        if name != "kvm_write_tsc_offset":
            continue
        f = e.fields
        try:
            prev, nxt = int(f["previous_tsc_offset"]) % _U64, int(f["next_tsc_offset"]) % _U64
            out.append(OffsetChange(int(e.ts), int(f["vcpu_id"]),
                                    prev - _U64 if prev >= 1 << 63 else prev,
                                    nxt - _U64 if nxt >= 1 << 63 else nxt))
        except (KeyError, TypeError, ValueError):
            raise VmtraceError("kvm_write_tsc_offset event at %s lacks vcpu_id/previous/next offsets" % e.ts)
    out.sort(key=lambda c: c.host_tsc)
    return out


class KvmTscMap:
    """guest TSC -> host clock, exact, per vCPU, following offset changes.

    ``vcpus`` is the state read from debugfs at the end (or start) of the recording;
    ``changes`` the offset writes seen in the host trace. A vCPU's offset history is
    rebuilt from them: before its first change it used that change's ``previous``.
    """

    method = "kvm"

    def __init__(self, vcpus: Dict[int, VcpuTsc], changes: Sequence[OffsetChange] = (),
                 host_tsc_to_ns: Optional[Callable[[np.ndarray], np.ndarray]] = None,
                 delta_ns: int = 0):
        if not vcpus:
            raise VmtraceError("KVM clock map needs at least one vCPU")
        self.vcpus = dict(vcpus)
        self.changes = list(changes)
        self.host_tsc_to_ns = host_tsc_to_ns
        self.delta_ns = int(delta_ns)
        # per vCPU: host-TSC start of each segment, and the offset used in it
        self.segments: Dict[int, tuple] = {}
        for v, st in self.vcpus.items():
            ch = [c for c in self.changes if c.vcpu == v]
            starts = [None] + [c.host_tsc for c in ch]
            offs = ([ch[0].previous] if ch else [st.offset]) + [c.next for c in ch]
            self.segments[v] = (starts, offs)

    def _unscale(self, g_minus_off: int, st: VcpuTsc) -> int:
        # the smallest h with (h * ratio) >> frac == g - off: an exact inverse for
        # every value the guest can actually have read
        return -((-(g_minus_off << st.frac_bits)) // st.ratio)

    def guest_to_host_tsc(self, g: int, vcpu: int) -> int:
        st = self.vcpus.get(vcpu)
        if st is None:
            raise VmtraceError("no TSC offset known for vCPU %d" % vcpu)
        starts, offs = self.segments[vcpu]
        # The latest segment whose start is not after the resulting host time wins:
        # an offset write that moves the guest TSC back makes some guest values
        # ambiguous; the later segment is the one that was current when they were read.
        for i in range(len(offs) - 1, -1, -1):
            h = self._unscale(g - offs[i], st)
            if starts[i] is None or h >= starts[i]:
                return h
        return self._unscale(g - offs[0], st)

    def to_host(self, ts: np.ndarray, cpu: Optional[np.ndarray] = None) -> np.ndarray:
        ts = np.asarray(ts)
        if cpu is None:
            if len(self.vcpus) != 1:
                raise VmtraceError("the KVM clock map needs each event's vCPU")
            cpu = np.full(ts.shape, next(iter(self.vcpus)))
        cpu = np.asarray(cpu)
        h = np.array([self.guest_to_host_tsc(int(g), int(c)) for g, c in zip(ts, cpu)], dtype=np.int64)
        if self.host_tsc_to_ns is not None:
            h = np.asarray(self.host_tsc_to_ns(h), dtype=np.int64)
        return h + self.delta_ns

    def shifted(self, delta_ns: int) -> "KvmTscMap":
        return KvmTscMap(self.vcpus, self.changes, self.host_tsc_to_ns, self.delta_ns + int(delta_ns))


def linear_tsc_to_ns(tsc0: int, ns0: int, tsc_khz: float) -> Callable[[np.ndarray], np.ndarray]:
    """Host TSC -> host ns for a constant-rate TSC (``tsc_khz`` from the kernel's log or
    a fit against CLOCK_MONOTONIC), anchored at one (tsc, ns) pair."""
    if tsc_khz <= 0:
        raise VmtraceError("TSC frequency must be positive")

    def conv(h: np.ndarray) -> np.ndarray:
        d = (np.asarray(h, dtype=np.int64) - tsc0).astype(np.float64)
        return ns0 + np.rint(d * (1e6 / tsc_khz)).astype(np.int64)

    return conv


def from_session(cfg: dict) -> KvmTscMap:
    """Build the map from a session.json guest's ``"sync": {"method": "kvm", ...}``.

    ``vcpus``: {"N": {"offset", "ratio", "frac_bits"}}, ``changes``: [[host_tsc, vcpu,
    prev, next], ...], optional ``tsc_khz`` with ``anchor`` [tsc, ns] when the host
    traces with ``mono`` rather than ``x86-tsc``. session.json is a file anyone may hand
    over: every number is checked against what KVM can hold (a ``frac_bits`` of 10**9
    would otherwise make each mapped timestamp a gigabyte-long integer).
    """
    def num(v, lo: int, hi: int, what: str) -> int:
        if type(v) is not int or not lo <= v <= hi:
            raise VmtraceError("session.json: bad kvm sync section (%s %.40r)" % (what, v))
        return v

    try:
        vcpus = {}
        for k, v in cfg["vcpus"].items():
            if not (isinstance(k, str) and _VCPU_KEY.match(k)):
                raise VmtraceError("session.json: bad kvm sync section (vcpu %.40r)" % (k,))
            frac = num(v.get("frac_bits", INTEL_FRAC_BITS), 0, 64, "frac_bits")
            vcpus[int(k)] = VcpuTsc(num(v["offset"], -(1 << 63), (1 << 63) - 1, "offset"),
                                    num(v.get("ratio", 1 << frac), 1, _U64 - 1, "ratio"), frac)
        changes = [OffsetChange(num(a, 0, _U64 - 1, "host_tsc"), num(b, 0, 1 << 16, "vcpu"),
                                num(c, -(1 << 63), (1 << 63) - 1, "offset"), num(d, -(1 << 63), (1 << 63) - 1, "offset"))
                   for a, b, c, d in cfg.get("changes", [])]
        conv = None
        if "tsc_khz" in cfg:
            t0, n0 = cfg["anchor"]
            khz = cfg["tsc_khz"]
            if isinstance(khz, bool) or not isinstance(khz, (int, float)) or not 1 <= khz <= 1e9:
                raise VmtraceError("session.json: bad kvm sync section (tsc_khz %.40r)" % (khz,))
            conv = linear_tsc_to_ns(num(t0, 0, _U64 - 1, "anchor"), num(n0, 0, (1 << 63) - 1, "anchor"), float(khz))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise VmtraceError("session.json: bad kvm sync section (%s)" % exc)
    changes.sort(key=lambda c: c.host_tsc)
    return KvmTscMap(vcpus, changes, conv)


def build(session: Any, name: str) -> Tuple["KvmTscMap", Any]:
    """The method's entry in :data:`vmtrace.clocksync.METHODS`: exact, from the KVM TSC
    offsets and scalings the recorder read (session.json ``sync``)."""
    from vmtrace.clocksync import SyncReport
    return from_session(session.source(name).sync), SyncReport(method="kvm", notes=["exact: KVM TSC offset/scaling"])
