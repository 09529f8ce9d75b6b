"""Offset and drift from time probes, NTP/PTP style.

A probe is ``(host_send, guest_clock, host_recv)``: the host reads its clock, sends a
probe, the guest agent reads its trace clock on receipt and answers, the host reads its
clock again. The guest's reading happened somewhere inside ``[host_send, host_recv]``,
so each probe bounds the offset ``guest - host`` to an interval of width equal to the
round trip; its middle is the NTP estimate. Probes that waited in a queue (long round
trip) tell us little, so, like NTP's clock filter, each window keeps only its quicker
probes and weights them by ``1/rtt^2``.

Probes are repeated through the recording, so the fit is done per window and the
windows' lines are joined into a piecewise-linear offset: a guest clock that drifts
(or whose drift changes, as a TCG guest's does when the host is loaded) is followed
instead of being averaged away.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence, Tuple

import numpy as np

from vmtrace.clocksync import PiecewiseOffsetMap, SyncReport
from vmtrace.errors import VmtraceError

Probe = Tuple[int, int, int]

DEFAULT_WINDOW_NS = 2_000_000_000   # refit every ~2 s of host time
MIN_WINDOW_PROBES = 8               # fewer than this: merge with the next window
KEEP_FRACTION = 0.5                 # keep the quicker half of each window's probes


def _validate(probes: Iterable[Sequence[int]]) -> np.ndarray:
    rows = []
    for i, p in enumerate(probes):
        try:
            s, g, r = (int(x) for x in p)
        except (TypeError, ValueError):
            raise VmtraceError("probe %d is not [host_send_ns, guest_clock_ns, host_recv_ns]: %r" % (i, p))
        if r < s:
            raise VmtraceError("probe %d received before it was sent (%d < %d)" % (i, r, s))
        rows.append((s, g, r))
    if not rows:
        raise VmtraceError("no time probes: cannot put this guest on the host's clock")
    rows.sort()
    return np.array(rows, dtype=object)


def _weighted_line(x: np.ndarray, y: np.ndarray, w: np.ndarray) -> Tuple[float, float]:
    """Weighted least squares y = a + b*x; returns (a, b). A single point gives b=0."""
    if len(x) < 2 or np.ptp(x) == 0:
        return float(np.average(y, weights=w)), 0.0
    W = w.sum()
    xm = (w * x).sum() / W
    ym = (w * y).sum() / W
    sxx = (w * (x - xm) ** 2).sum()
    b = (w * (x - xm) * (y - ym)).sum() / sxx
    return float(ym - b * xm), float(b)


def fit(probes: Iterable[Sequence[int]], *, window_ns: int = DEFAULT_WINDOW_NS,
        min_window_probes: int = MIN_WINDOW_PROBES,
        keep_fraction: float = KEEP_FRACTION) -> Tuple[PiecewiseOffsetMap, SyncReport]:
    """Fit guest->host from probes; return the map and how good it is."""
    rows = _validate(probes)
    send = np.array([int(v) for v in rows[:, 0]], dtype=object)
    gclk = np.array([int(v) for v in rows[:, 1]], dtype=object)
    recv = np.array([int(v) for v in rows[:, 2]], dtype=object)
    # Exact integer arithmetic first, then small floats relative to references.
    h0 = int(send[0])
    g0 = int(gclk[0])
    base = g0 - (int(send[0]) + int(recv[0])) // 2        # offset of the first probe
    rtt = np.array([int(r - s) for s, r in zip(send, recv)], dtype=np.float64)
    mid = np.array([int(s - h0) for s in send], dtype=np.float64) + rtt / 2.0   # host, rel h0
    gx = np.array([int(g - g0) for g in gclk], dtype=np.float64)                # guest, rel g0
    # offset - base = (g - base - h0) - mid: the big terms cancel in exact integers.
    off = np.array([float(int(g) - base - h0) for g in gclk]) - mid
    half = rtt / 2.0

    lo_b, hi_b = off - half, off + half          # each probe's offset interval
    windows = _windows(mid, window_ns, min_window_probes)
    kx, ky, used_idx, bounds = [], [], [], []
    for lo, hi in windows:
        idx = np.arange(lo, hi)
        quick = idx
        if len(idx) > 2:
            quick = idx[rtt[idx] <= np.quantile(rtt[idx], keep_fraction)]
        w = 1.0 / np.maximum(half[quick], 1.0) ** 2
        a, b = _weighted_line(gx[quick], off[quick], w)
        band = _widest_band(gx[idx], lo_b[idx], hi_b[idx], b)
        if band is not None:
            a, b, width = band
            bounds.append(width / 2.0)
            used_idx.extend(idx.tolist())
        else:
            used_idx.extend(quick.tolist())
            bounds.append(None)
        # two knots per window: every probe is mapped by its own window's line, and
        # the gaps between windows are bridged linearly.
        for x in (float(gx[lo]), float(gx[hi - 1])):
            if kx and x <= kx[-1]:
                continue
            kx.append(x)
            ky.append(a + b * x)
    cmap = PiecewiseOffsetMap([g0 + int(round(x)) for x in kx], ky, base=base, method="ptp")

    used = np.array(sorted(set(used_idx)), dtype=np.int64)
    fitted = cmap.offset_at(np.array([int(g) for g in gclk], dtype=np.int64))
    resid = off - fitted
    fallback = _window_bounds(windows, resid, half)
    bound = np.array([f if b is None else b for b, f in zip(bounds, fallback)])
    span = gx[-1] - gx[0]
    drift = (cmap.offset_at(np.array([int(gclk[-1])], dtype=np.int64))[0]
             - cmap.offset_at(np.array([int(gclk[0])], dtype=np.int64))[0]) / span * 1e6 if span > 0 else 0.0
    report = SyncReport(
        method="ptp",
        probes=len(rows),
        used=len(used),
        error_ns=float(np.median(bound)),
        max_error_ns=float(bound.max()),
        rtt_median_ns=float(np.median(rtt)),
        residual_rms_ns=float(np.sqrt(np.mean(resid[used] ** 2))),
        drift_ppm=float(drift),
        segments=len(windows),
    )
    return cmap, report


def _widest_band(x: np.ndarray, lo: np.ndarray, hi: np.ndarray, b0: float,
                 span_ppm: float = 2000.0):
    """The line a + b*x that passes through every probe's interval [lo, hi] with the
    largest margin, or None if no line does.

    For a slope b the feasible intercepts are [max(lo - b x), min(hi - b x)]; the width
    of that range is concave in b, so a golden-section search finds the best slope. The
    true offset line lies in the band, so half the band's width bounds the error. This
    uses the probes as hard bounds (like the convex-hull methods of clock sync) rather
    than assuming the two halves of the round trip take equally long, which NTP's
    midpoint does and which a guest answering from a busy vCPU does not honour.
    """
    if len(x) == 1:
        return float((lo[0] + hi[0]) / 2), 0.0, float(hi[0] - lo[0])

    def width(b: float) -> float:
        return float(np.min(hi - b * x) - np.max(lo - b * x))

    g = (np.sqrt(5) - 1) / 2
    left, right = b0 - span_ppm * 1e-6, b0 + span_ppm * 1e-6
    c, d = right - g * (right - left), left + g * (right - left)
    wc, wd = width(c), width(d)
    for _ in range(80):
        if wc < wd:
            left, c, wc = c, d, wd
            d = left + g * (right - left)
            wd = width(d)
        else:
            right, d, wd = d, c, wc
            c = right - g * (right - left)
            wc = width(c)
    b = (left + right) / 2
    w = width(b)
    if w < 0:
        return None
    a = (float(np.max(lo - b * x)) + float(np.min(hi - b * x))) / 2
    return a, b, w


def _window_bounds(windows: list, resid: np.ndarray, half: np.ndarray) -> np.ndarray:
    """How far the fit can be from the true offset, per window.

    Within a window the fit error e is close to constant, and each probe confines it to
    ``[-r - half, -r + half]`` (r: the probe's residual). Intersecting those intervals
    gives a bound that the quickest probes make tight, as in NTP. If they do not
    intersect (the offset bent inside the window), the best single probe's bound is used.
    """
    out = []
    for lo, hi in windows:
        r, h = resid[lo:hi], half[lo:hi]
        low, up = np.max(-r - h), np.min(-r + h)
        if low <= up:
            out.append(max(abs(low), abs(up)))
        else:
            out.append(float(np.min(np.abs(r) + h)))
    return np.array(out, dtype=np.float64)


def _windows(mid: np.ndarray, window_ns: int, min_probes: int) -> list:
    """Split probe indices (sorted by host time) into windows of >= window_ns and
    >= min_probes probes; a short tail joins the last window."""
    out = []
    start = 0
    n = len(mid)
    for i in range(n):
        if (mid[i] - mid[start] >= window_ns and i - start >= min_probes):
            out.append((start, i))
            start = i
    if start < n:
        if out and n - start < min_probes:
            out[-1] = (out[-1][0], n)
        else:
            out.append((start, n))
    return out


def build(session: Any, name: str) -> Tuple[Any, Any]:
    """The method's entry in :data:`vmtrace.clocksync.METHODS`: a fit of the guest's
    time probes (their trace_marker timestamps where the trace has them)."""
    return fit(session.fit_probes(name))
