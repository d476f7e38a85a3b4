"""kdml.benchmark.stats against an independent NumPy / SciPy computation."""

import math

import numpy as np
import pytest
from scipy import stats

from kdml.benchmark.stats import mean_interval, paired_difference


def test_mean_interval_is_the_student_t_interval():
    x = np.array([0.61, 0.64, 0.58, 0.66, 0.63])
    low, high = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    got = mean_interval(x)
    assert got["mean"] == pytest.approx(x.mean())
    assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    # by hand: t_{0.975, 4} = 2.776445 (tables), s = std(ddof=1)
    assert got["half_width"] == pytest.approx(2.776445 * x.std(ddof=1) / math.sqrt(5), rel=1e-6)
    assert got["n"] == 5
    assert math.isnan(mean_interval([0.5])["half_width"])


def test_paired_difference_matches_a_hand_computed_paired_t_test():
    method = np.array([0.64, 0.66, 0.61, 0.67, 0.65])
    base = np.array([0.62, 0.63, 0.61, 0.64, 0.60])
    d = method - base
    t = d.mean() / (d.std(ddof=1) / math.sqrt(len(d)))
    p = 2 * stats.t.sf(abs(t), len(d) - 1)
    got = paired_difference(method, base)
    assert got["mean"] == pytest.approx(d.mean())
    assert got["t_p"] == pytest.approx(p)
    low, high = stats.t.interval(0.95, len(d) - 1, loc=d.mean(), scale=stats.sem(d))
    assert (got["low"], got["high"]) == (pytest.approx(low), pytest.approx(high))
    assert got["above_zero"] == (low > 0) and got["wins"] == 4


def test_holm_adjustment_matches_a_hand_computation():
    from kdml.benchmark.stats import holm

    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.5, float("nan")]) == pytest.approx([1.0, 1.0])
    assert holm([0.2]) == [0.2] and holm([]) == []
    # the family-wise error rate: with 10 true nulls, Holm rejects in about 5 % of families
    rng = np.random.default_rng(0)
    families = rng.uniform(size=(4000, 10))
    rejected = np.mean([min(holm(f)) < 0.05 for f in families])
    assert rejected < 0.06 and np.mean(families.min(axis=1) < 0.05) > 0.35


def test_no_difference_is_not_a_win():
    got = paired_difference([0.5, 0.6, 0.7], [0.5, 0.6, 0.7])
    assert got["mean"] == 0 and math.isnan(got["t_p"]) and not got["above_zero"]


def test_unpaired_values_are_refused():
    with pytest.raises(ValueError, match="same seeds"):
        paired_difference([0.1, 0.2], [0.1])


def test_tost_against_the_two_one_sided_tests_by_hand():
    from kdml.benchmark.stats import tost

    d = np.array([0.004, -0.006, 0.010, 0.001, -0.003, 0.005])  # per-seed differences
    n, mean, s = len(d), d.mean(), d.std(ddof=1)
    se = s / math.sqrt(n)
    # H0: mu <= -0.02 vs H1: mu > -0.02, and H0: mu >= +0.02 vs H1: mu < +0.02
    t_low, t_high = (mean + 0.02) / se, (mean - 0.02) / se
    p_low = 1 - stats.t.cdf(t_low, n - 1)
    p_high = stats.t.cdf(t_high, n - 1)
    assert tost(d, 0.02) == pytest.approx(max(p_low, p_high))
    assert tost(d, 0.02) < 0.001  # well inside +-2 points
    # the same by the one-sided ttest of SciPy
    assert tost(d, 0.02) == pytest.approx(max(stats.ttest_1samp(d, -0.02, alternative="greater").pvalue,
                                              stats.ttest_1samp(d, 0.02, alternative="less").pvalue))
    # a difference near the margin is not shown equivalent
    assert tost(d + 0.019, 0.02) > 0.05
    assert tost([0.01, 0.01, 0.01], 0.02) == 0.0 and tost([0.03, 0.03], 0.02) == 1.0
    assert math.isnan(tost([0.01], 0.02))


def test_the_minimum_detectable_difference_and_the_seeds_it_needs():
    from kdml.benchmark.stats import minimum_detectable_difference, seeds_for

    # 18 seeds, SD 2.1 points, Holm's first step over 6 comparisons, 80 % power
    expected = (stats.t.ppf(1 - 0.05 / 12, 17) + stats.t.ppf(0.8, 17)) * 0.021 / math.sqrt(18)
    assert minimum_detectable_difference(0.021, 18, 0.05 / 6) == pytest.approx(expected)
    assert expected < 0.02
    # 17 seeds reach 2 points at SD 2.1, 18 (the omniglot preset) still at SD 2.2
    assert seeds_for(0.021, 0.02, 0.05 / 6) == 17 and seeds_for(0.022, 0.02, 0.05 / 6) == 18
    assert minimum_detectable_difference(0.021, 16, 0.05 / 6) > 0.02
    assert math.isnan(minimum_detectable_difference(0.02, 1, 0.05))
