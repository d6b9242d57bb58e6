"""The paired bootstrap against closed forms: a constant difference has no spread, and a large-n
Bernoulli difference's interval is the normal approximation's."""

import numpy as np
import pytest

from fgdist.report.bootstrap import mean_and_standard_error, paired_difference


def test_a_constant_paired_difference_gives_a_point_interval():
    rng = np.random.default_rng(1)
    b = 100.0 * (rng.random(300) < 0.4)  # per-query hits in percent, as fgdist.training.per_query gives them
    d = paired_difference(b + 2.5, b)
    assert (d.value, d.low, d.high, d.n) == (2.5, 2.5, 2.5, 300)
    assert not d.holds_zero
    same = paired_difference(b, b)
    assert (same.value, same.low, same.high) == (0.0, 0.0, 0.0) and same.holds_zero


def test_a_large_bernoulli_difference_matches_the_normal_approximation():
    rng = np.random.default_rng(2)
    n = 3000
    a, b = 100.0 * (rng.random(n) < 0.35), 100.0 * (rng.random(n) < 0.30)
    d = paired_difference(a, b, seed=7)
    diffs = a - b
    mean, half = diffs.mean(), 1.959964 * diffs.std(ddof=1) / np.sqrt(n)
    assert d.value == pytest.approx(mean, abs=1e-12)
    # The percentile bootstrap's Monte Carlo error at 10,000 resamples is about 1.5% of the half-width.
    assert d.low == pytest.approx(mean - half, abs=0.06 * half)
    assert d.high == pytest.approx(mean + half, abs=0.06 * half)
    assert 1.5 < half < 3.0  # about 2.4 points: the scale of the main job's interval
    assert paired_difference(a, b, seed=7) == d  # seeded: the same runs give the same interval


def test_queries_that_do_not_count_are_left_out_and_shapes_must_match():
    a = np.array([1.0, np.nan, 3.0, 5.0])
    b = np.array([0.0, np.nan, 1.0, 1.0])
    d = paired_difference(a, b)
    assert d.n == 3 and d.value == pytest.approx((1 + 2 + 4) / 3)
    with pytest.raises(ValueError, match="the same queries"):
        paired_difference(a, b[:3])
    with pytest.raises(ValueError, match="no query counts"):
        paired_difference(np.array([np.nan]), np.array([np.nan]))


def test_mean_and_standard_error_over_seeds():
    assert mean_and_standard_error([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0 / np.sqrt(3)))
    assert mean_and_standard_error([4.0]) == (4.0, None)
