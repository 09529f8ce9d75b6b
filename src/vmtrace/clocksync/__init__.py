"""Putting a guest's timestamps on the host's clock.

A guest traces with its own clock (``mono``, ``boot``, ``x86-tsc`` ...). To show guests
and host on one timeline every guest timestamp must be mapped onto the host's clock
(CLOCK_MONOTONIC, trace clock ``mono``). Like trace-cmd's timesync, there is one small
interface and one module per method:

* :mod:`vmtrace.clocksync.ptp` fits offset and drift from time probes (host send time,
  guest clock at receipt, host receive time), NTP/PTP style, with the round trip as the
  error bound. Works for any guest, including TCG.
* :mod:`vmtrace.clocksync.tcg` is for QEMU TCG guests tracing with ``x86-tsc``: one
  constant offset per run segment, found by requiring every guest event to fall inside
  an on-CPU interval of its vCPU's host thread (:mod:`vmtrace.clocksync.containment`);
  microseconds where probes give milliseconds.
* :mod:`vmtrace.clocksync.kvm` is exact for KVM guests that trace with ``x86-tsc``: the
  TSC offset and scaling KVM programs into the vCPU, read from debugfs and followed
  through ``kvm_write_tsc_offset`` events.

The methods are a table, like the codecs of :mod:`vmtrace.format.compress`:
:data:`METHODS` names each method's module, and every module has
``build(session, name) -> (ClockMap, SyncReport)``. A guest's entry in session.json
says which method its recorder prepared for (``sync.method``); without one the probe
fit is used. Adding a method is one module and one line here (docs/internals.md).

Every method returns a :class:`ClockMap`. A map must be monotonic (non-decreasing) so
that mapping a guest's time-ordered events keeps them in order, which lets the merge
stream events instead of sorting them.

Timestamps are integers in ns and can be large (``tai`` is ~1.8e18), beyond float64's
exact range, so maps keep an integer reference and only do floating point on the small
differences from it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Mapping, Optional, Protocol, Sequence, runtime_checkable

import numpy as np

from vmtrace.errors import VmtraceError

__all__ = ["ClockMap", "IdentityMap", "PiecewiseOffsetMap", "SyncReport", "VmtraceError", "marker_seq",
           "METHODS", "DEFAULT_METHOD", "build_map"]

# name -> module with build(session, name); session.json's sync.method picks one.
METHODS = {
    "kvm": "vmtrace.clocksync.kvm",
    "ptp": "vmtrace.clocksync.ptp",
    "tcg": "vmtrace.clocksync.tcg",
}
DEFAULT_METHOD = "ptp"


def build_map(session: object, name: str, method: Optional[str] = None) -> "tuple":
    """(ClockMap, SyncReport) for guest ``name`` of an analysis session, by ``method``
    (default: the guest's ``sync.method`` in session.json, else :data:`DEFAULT_METHOD`)."""
    import importlib
    method = method or DEFAULT_METHOD
    if method not in METHODS:
        raise VmtraceError("guest %s: unknown clock sync method %r (have: %s)" % (name, method, ", ".join(METHODS)))
    return importlib.import_module(METHODS[method]).build(session, name)

# ASCII digits only: str.isdigit() also accepts "²" and other digits int() refuses, and
# a marker's text is written by the guest.
_SEQ = re.compile(r"^-?[0-9]{1,18}\Z")


def marker_seq(kv: Mapping[str, str]) -> Optional[int]:
    """The ``seq=N`` of a ``vmtrace-probe``/``vmtrace-order`` marker line, or None."""
    seq = kv.get("seq")
    return int(seq) if isinstance(seq, str) and _SEQ.match(seq) else None


@runtime_checkable
class ClockMap(Protocol):
    """guest clock -> host clock (CLOCK_MONOTONIC ns)."""

    method: str

    def to_host(self, ts: np.ndarray, cpu: Optional[np.ndarray] = None) -> np.ndarray:
        """Map an int64/uint64 array of guest timestamps; ``cpu`` for per-vCPU methods."""
        ...

    def shifted(self, delta_ns: int) -> "ClockMap":
        """The same map with ``delta_ns`` added to every result (used to prove the
        causality check can fail)."""
        ...


@dataclass
class SyncReport:
    """What a fit found, for ``vmtrace check`` and the session report."""

    method: str
    probes: int = 0               # probes offered
    used: int = 0                 # probes that shaped the fit (the low round-trip ones)
    error_ns: float = 0.0         # estimated sync error: median bound over used probes
    max_error_ns: float = 0.0     # worst bound over used probes
    rtt_median_ns: float = 0.0
    residual_rms_ns: float = 0.0  # offset residuals of used probes around the fit
    drift_ppm: float = 0.0        # mean rate difference guest vs host
    segments: int = 0
    notes: list = field(default_factory=list)
    evidence: dict = field(default_factory=dict)   # method-specific counts for `vmtrace check`


class IdentityMap:
    """The host's own clock."""

    method = "identity"

    def __init__(self, delta_ns: int = 0):
        self.delta_ns = int(delta_ns)

    def to_host(self, ts: np.ndarray, cpu: Optional[np.ndarray] = None) -> np.ndarray:
        return np.asarray(ts, dtype=np.int64) + self.delta_ns

    def shifted(self, delta_ns: int) -> "IdentityMap":
        return IdentityMap(self.delta_ns + int(delta_ns))


class PiecewiseOffsetMap:
    """host = guest - offset(guest), offset piecewise linear in guest time.

    The knots are where the offset is known best (the middle of each probe window);
    between knots it is interpolated, beyond the ends extrapolated with the end
    segments' slopes, so drift keeps being followed past the last probe. Offsets are
    stored as ``base`` (int) plus small float differences, see the module docstring.
    """

    method = "ptp"

    def __init__(self, knots_guest: Sequence[int], offsets: Sequence[int | float], *, base: int = 0,
                 method: str = "ptp", delta_ns: int = 0):
        if len(knots_guest) == 0 or len(knots_guest) != len(offsets):
            raise VmtraceError("clock map needs at least one (guest time, offset) knot")
        self.g0 = int(knots_guest[0])
        self.kx = np.array([int(k) - self.g0 for k in knots_guest], dtype=np.float64)
        if np.any(np.diff(self.kx) <= 0):
            raise VmtraceError("clock map knots must be strictly increasing in guest time")
        self.base = int(base)
        self.ky = np.asarray(offsets, dtype=np.float64)  # offset - base, in ns
        slopes = np.diff(self.ky) / np.diff(self.kx) if len(self.kx) > 1 else np.zeros(0)
        if np.any(slopes >= 1.0):
            # host = g - offset(g) must not decrease, or merged order would break.
            raise VmtraceError("clock map is not monotonic (offset grows faster than time)")
        self.method = method
        self.delta_ns = int(delta_ns)

    def offset_at(self, ts: np.ndarray) -> np.ndarray:
        """offset - base at guest times ``ts`` (float ns)."""
        x = (np.asarray(ts, dtype=np.int64) - self.g0).astype(np.float64)
        kx, ky = self.kx, self.ky
        if len(kx) == 1:
            return np.full(x.shape, ky[0])
        y = np.interp(x, kx, ky)
        lo = x < kx[0]
        if lo.any():
            y[lo] = ky[0] + (x[lo] - kx[0]) * (ky[1] - ky[0]) / (kx[1] - kx[0])
        hi = x > kx[-1]
        if hi.any():
            y[hi] = ky[-1] + (x[hi] - kx[-1]) * (ky[-1] - ky[-2]) / (kx[-1] - kx[-2])
        return y

    def to_host(self, ts: np.ndarray, cpu: Optional[np.ndarray] = None) -> np.ndarray:
        g = np.asarray(ts).astype(np.int64)
        return g - self.base - np.rint(self.offset_at(g)).astype(np.int64) + self.delta_ns

    def shifted(self, delta_ns: int) -> "PiecewiseOffsetMap":
        m = PiecewiseOffsetMap.__new__(PiecewiseOffsetMap)
        m.__dict__.update(self.__dict__)
        m.delta_ns = self.delta_ns + int(delta_ns)
        return m

    def __repr__(self) -> str:
        return "PiecewiseOffsetMap(%s, %d knots, base=%d)" % (self.method, len(self.kx), self.base)


def map_one(cmap: ClockMap, ts: int, cpu: Optional[int] = None) -> int:
    """Map a single timestamp (convenience for callers that are not vectorised)."""
    return int(cmap.to_host(np.array([ts], dtype=np.int64),
                            None if cpu is None else np.array([cpu]))[0])
