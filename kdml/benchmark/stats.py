"""Seed statistics: mean with a Student-t 95 % interval, paired differences, Holm's
correction, equivalence (TOST) and the minimum detectable difference.

With n seeds, `mean_interval` is mean +- t_{0.975, n-1} s / sqrt(n) (s the sample
standard deviation, ddof = 1). `paired_difference` applies it to the per-seed
differences method - base on the same seeds, with the two-sided paired t-test
(`scipy.stats.ttest_rel`). `holm` adjusts the p-values of a family of comparisons
(Holm, "A simple sequentially rejective multiple test procedure", 1979). `tost` is the
equivalence test within a declared margin, and `minimum_detectable_difference` what a
comparison could detect at a given level and power.
"""

from __future__ import annotations

import math
from typing import Dict, Sequence

import numpy as np
from scipy import stats


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> Dict:
    """Mean and its t interval over seeds.

    Args:
        values: one value per seed.
        confidence: coverage of the interval.

    Returns:
        `{"mean", "low", "high", "half_width", "n"}`; with one value the interval is
        undefined (NaN half width).
    """
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or not len(x):
        raise ValueError(f"Expected a non-empty 1-D sequence of per-seed values. Received: {values!r}")
    n, mean = len(x), float(x.mean())
    if n < 2:
        half = math.nan
    else:
        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))
    return {"mean": mean, "low": mean - half, "high": mean + half, "half_width": half, "n": n}


def paired_difference(method: Sequence[float], base: Sequence[float],
                      confidence: float = 0.95) -> Dict:
    """Method minus base on the same seeds: mean, t interval and paired t-test.

    Args:
        method, base: per-seed values, `method[i]` and `base[i]` from the same seed.

    Returns:
        `mean_interval` of the differences plus `"t_p"` (two-sided paired t-test p-value;
        NaN when every difference is zero), `"sd"` (their standard deviation, ddof = 1),
        `"differences"` (per seed), `"wins"` (seeds where the method is higher) and
        `"above_zero"` (the interval's low end > 0, uncorrected).
    """
    a, b = np.asarray(method, dtype=np.float64), np.asarray(base, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(
            f"Expected per-seed values of the same seeds for the method and its base. "
            f"Received: {len(a)} and {len(b)} values.")
    diff = a - b
    result = mean_interval(diff, confidence)
    if len(diff) >= 2 and np.any(diff != diff[0]):
        result["t_p"] = float(stats.ttest_rel(a, b).pvalue)
    else:  # constant differences: no spread, the t statistic is undefined
        result["t_p"] = math.nan if np.all(diff == 0) or len(diff) < 2 else 0.0
    result["sd"] = float(diff.std(ddof=1)) if len(diff) >= 2 else math.nan
    result["differences"] = diff.tolist()
    result["wins"] = int(np.sum(diff > 0))
    result["above_zero"] = bool(result["low"] > 0)
    return result


def holm(p_values: Sequence[float]) -> list:
    """Holm-Bonferroni adjusted p-values, in the input order.

    With m p-values sorted ascending, p_(i) becomes max_{j <= i} min(1, (m - j + 1) p_(j));
    rejecting where the adjusted value is below alpha controls the family-wise error rate
    at alpha. A NaN p-value (no spread: every difference equal) counts as 1.
    """
    p = np.array([1.0 if math.isnan(v) else float(v) for v in p_values])
    m = len(p)
    adjusted = np.empty(m)
    running = 0.0
    for rank, i in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (m - rank) * p[i]))
        adjusted[i] = running
    return adjusted.tolist()


def tost(differences: Sequence[float], margin: float) -> float:
    """p-value of the paired two one-sided t-tests (TOST) that the mean difference lies
    inside (-margin, +margin).

    With d the per-seed differences, n seeds, s their standard deviation (ddof = 1) and
    se = s / sqrt(n): t_low = (mean + margin) / se tests H0: mu <= -margin, t_high =
    (mean - margin) / se tests H0: mu >= +margin, and the TOST p is
    max(P(T > t_low), P(T < t_high)) with T ~ t(n - 1) (Schuirmann 1987). Equivalence
    within +-margin is shown at level alpha when p < alpha. Constant differences (s = 0):
    0 inside the margin, 1 outside; NaN with fewer than 2 seeds.
    """
    d = np.asarray(differences, dtype=np.float64)
    if d.ndim != 1:
        raise ValueError(f"Expected 1-D per-seed differences. Received shape {d.shape}.")
    n = len(d)
    if n < 2:
        return math.nan
    mean, sd = float(d.mean()), float(d.std(ddof=1))
    if sd == 0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    p_low = float(stats.t.sf((mean + margin) / se, n - 1))
    p_high = float(stats.t.cdf((mean - margin) / se, n - 1))
    return max(p_low, p_high)


def minimum_detectable_difference(sd: float, n: int, alpha: float, power: float = 0.8) -> float:
    """The smallest true paired difference that a two-sided paired t-test at level `alpha`
    detects with probability `power`, for n seeds and per-seed difference SD `sd`:
    (t_{1 - alpha/2, n-1} + t_{power, n-1}) sd / sqrt(n) (the usual normal-shift
    approximation of the noncentral t). At Holm's level of its first step, alpha is the
    family's alpha / m. NaN with fewer than 2 seeds."""
    if n < 2 or math.isnan(sd):
        return math.nan
    return float((stats.t.ppf(1 - alpha / 2, n - 1) + stats.t.ppf(power, n - 1))
                 * sd / math.sqrt(n))


def seeds_for(sd: float, target: float, alpha: float, power: float = 0.8,
              largest: int = 200) -> int:
    """The fewest seeds n >= 2 whose `minimum_detectable_difference` is <= `target`."""
    for n in range(2, largest + 1):
        if minimum_detectable_difference(sd, n, alpha, power) <= target:
            return n
    raise ValueError(f"More than {largest} seeds needed for a difference of {target} at SD {sd}.")
