"""The overhead arithmetic and statistics behind every benchmark figure."""
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from vmtrace.bench import stats
from vmtrace.errors import VmtraceError


def test_overhead_matches_the_seed_formula():
    # seeds/002: native 28807569.5, virtio-trace 28685049.5 -> 0.43 %; virtio-serial 53.96 %
    assert stats.overhead_pct(28685049.5, 28807569.5) == pytest.approx(0.4253, abs=1e-3)
    assert stats.overhead_pct(13262258.7, 28807569.5) == pytest.approx(53.96, abs=1e-2)


def test_overhead_sign_and_reference():
    assert stats.overhead_pct(100.0, 100.0) == 0.0
    assert stats.overhead_pct(120.0, 100.0) == pytest.approx(-20.0)
    assert stats.overhead_pct(50.0, 100.0) == pytest.approx(50.0)


def test_overhead_rejects_a_zero_reference():
    with pytest.raises(VmtraceError, match="native score must be positive"):
        stats.overhead_pct(1.0, 0.0)


def test_summary_of_odd_and_even_samples():
    s = stats.summarize([3, 1, 2])
    assert (s.n, s.median, s.min, s.max) == (3, 2.0, 1.0, 3.0)
    assert s.spread_pct == pytest.approx(100.0)
    s = stats.summarize([10, 20, 30, 40])
    assert s.median == 25.0
    assert s.as_dict() == {"n": 4, "median": 25.0, "min": 10.0, "max": 40.0, "spread_pct": pytest.approx(120.0)}


def test_summary_with_zero_median_has_no_spread():
    assert stats.summarize([0, 0]).spread_pct is None


def test_summary_of_nothing_is_a_clear_error():
    with pytest.raises(VmtraceError, match="no samples"):
        stats.summarize([])


def test_paired_overheads_pair_by_repetition():
    pairs = stats.paired_overheads([90, 95, 80], [100, 100, 100])
    assert pairs == pytest.approx([10.0, 5.0, 20.0])
    # a failed run leaves one side shorter: the extra sample is ignored, not misaligned
    assert stats.paired_overheads([90, 95], [100, 50, 100]) == pytest.approx([10.0, -90.0])


def test_overhead_summary_uses_medians_and_pair_range():
    o = stats.overhead_summary([90, 95, 80], [100, 110, 90])
    assert o["median"] == pytest.approx((1 - 90 / 100) * 100)
    pairs = [10.0, (1 - 95 / 110) * 100, (1 - 80 / 90) * 100]
    assert o["min"] == pytest.approx(min(pairs))
    assert o["max"] == pytest.approx(max(pairs))


@given(st.lists(st.floats(min_value=1e-3, max_value=1e9), min_size=1, max_size=20))
def test_summary_bounds_hold(values):
    s = stats.summarize(values)
    assert s.min <= s.median <= s.max
    assert s.n == len(values)


@given(st.floats(min_value=1e-3, max_value=1e9), st.floats(min_value=1e-3, max_value=1e9))
def test_overhead_is_consistent_with_the_ratio(score, native):
    o = stats.overhead_pct(score, native)
    assert math.isclose(score / native, 1 - o / 100, rel_tol=1e-9, abs_tol=1e-12)
    assert (o > 0) == (score < native) or math.isclose(score, native)
