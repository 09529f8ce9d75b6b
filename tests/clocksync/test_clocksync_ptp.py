"""The probe fit on constructed probes whose true offset and drift are known.

Constructed data is the only way to know the truth exactly; the real-clock proof is in
tests/report/test_merge_pseudosession.py. Offsets are as large as CLOCK_TAI's (1.8e18 ns) to catch
float64 precision loss.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from vmtrace.clocksync import IdentityMap, PiecewiseOffsetMap, map_one, ptp
from vmtrace.errors import VmtraceError

BIG = 1_795_437_000_000_123_457


def make_probes(n, offset, drift_ppm, seed=0, rtt=(20_000, 200_000), gap=25_000_000, drift_change=None):
    """Probes from a guest clock g(t) = t + offset + drift*t (host t), with random
    one-way delays; returns probes and the true inverse host(g)."""
    rng = np.random.default_rng(seed)
    t0 = 1_000_000_000

    def guest(t):
        d = drift_ppm * 1e-6 * (t - t0)
        if drift_change is not None and t > drift_change[0]:
            d += drift_change[1] * 1e-6 * (t - drift_change[0])
        return t + offset + int(round(d))

    probes = []
    for i in range(n):
        s = t0 + i * gap + int(rng.integers(0, 1000))
        d1, d2 = (int(x) for x in rng.integers(rtt[0] // 2, rtt[1] // 2, size=2))
        probes.append((s, guest(s + d1), s + d1 + d2))
    return probes, guest


def true_error(cmap, guest, times):
    g = np.array([guest(t) for t in times], dtype=np.int64)
    return np.abs(cmap.to_host(g) - np.array(times, dtype=np.int64))


def test_constant_offset_is_found_within_the_bound():
    probes, guest = make_probes(200, BIG, 0.0)
    cmap, rep = ptp.fit(probes)
    times = list(range(1_000_000_000, 1_000_000_000 + 200 * 25_000_000, 7_777_777))
    err = true_error(cmap, guest, times)
    assert err.max() <= rep.max_error_ns + 1
    assert rep.error_ns < 20_000        # the quickest probes pin it far below the median rtt
    assert rep.rtt_median_ns > 50_000
    assert abs(rep.drift_ppm) < 5


def test_drift_is_followed_and_change_of_drift_too():
    # 10 s of probes; drift 30 ppm, then +40 ppm from t=6 s: a single line would be
    # off by ~80 us at the ends, the windowed fit must not be.
    probes, guest = make_probes(400, -BIG // 3, 30.0, seed=3, drift_change=(7_000_000_000, 40.0))
    cmap, rep = ptp.fit(probes)
    assert rep.segments >= 4
    times = [p[0] for p in probes]
    err = true_error(cmap, guest, times)
    assert err.max() < 40_000
    assert 30 < rep.drift_ppm < 60
    # every probe's own guest reading maps inside its round trip
    h = cmap.to_host(np.array([p[1] for p in probes], dtype=np.int64))
    assert all(p[0] <= x <= p[2] for p, x in zip(probes, h.tolist()))


def test_map_is_monotonic_and_extrapolates():
    probes, guest = make_probes(50, BIG, 15.0, seed=5)
    cmap, _ = ptp.fit(probes)
    g = np.linspace(probes[0][1] - 10**10, probes[-1][1] + 10**10, 5000).astype(np.int64)
    h = cmap.to_host(g)
    assert np.all(np.diff(h) >= 0)
    later = 1_000_000_000 + 60 * 25_000_000 + 10**9       # beyond the last probe
    assert true_error(cmap, guest, [later])[0] < 50_000


def test_asymmetric_delays_stay_inside_the_round_trip():
    # answer always written near the end of the round trip (the NTP midpoint's blind
    # spot): the band fit still maps every reading inside its probe
    rng = np.random.default_rng(9)
    probes = []
    for i in range(100):
        s = 10**9 + i * 10**7
        rtt = int(rng.integers(2_000, 10_000))
        at = s + rtt - 300
        probes.append((s, at + BIG, s + rtt))
    cmap, rep = ptp.fit(probes)
    h = cmap.to_host(np.array([p[1] for p in probes], dtype=np.int64))
    assert all(p[0] <= x <= p[2] for p, x in zip(probes, h.tolist()))


@settings(max_examples=40, deadline=None)
@given(offset=st.integers(-2**62, 2**62), drift=st.floats(-200, 200), seed=st.integers(0, 1000),
       n=st.integers(1, 60))
def test_any_offset_and_drift(offset, drift, seed, n):
    probes, guest = make_probes(n, offset, drift, seed=seed)
    cmap, rep = ptp.fit(probes)
    h = cmap.to_host(np.array([p[1] for p in probes], dtype=np.int64))
    # the truth is inside each probe's round trip, so is a consistent fit
    assert all(p[0] - 1 <= x <= p[2] + 1 for p, x in zip(probes, h.tolist()))
    assert rep.probes == n


def test_shifted_and_identity():
    probes, _ = make_probes(20, BIG, 0.0)
    cmap, _ = ptp.fit(probes)
    g = probes[5][1]
    assert map_one(cmap.shifted(1234), g) - map_one(cmap, g) == 1234
    assert map_one(IdentityMap().shifted(-5), 100) == 95


def test_bad_probes_are_one_line_errors():
    with pytest.raises(VmtraceError, match="no time probes"):
        ptp.fit([])
    with pytest.raises(VmtraceError, match="received before it was sent"):
        ptp.fit([(10, 5, 9)])
    with pytest.raises(VmtraceError, match="probe 0 is not"):
        ptp.fit([("a", 1)])
    with pytest.raises(VmtraceError, match="not monotonic"):
        PiecewiseOffsetMap([0, 10], [0, 20])
