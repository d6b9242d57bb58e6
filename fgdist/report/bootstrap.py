"""The paired bootstrap: a difference of two runs' metric, with a confidence interval over the test
queries both were evaluated on.

A metric is a mean over queries (`fgdist.training.per_query`), so the difference of two runs is the mean
of the per-query differences d_i. A resample draws n queries with replacement (seeded) and takes
the mean of their d; the interval is the 2.5th and 97.5th percentile of RESAMPLES such means (the
percentile bootstrap, Efron and Tibshirani, ch. 13). It says how much the difference would move
with another test set of the same size from the same distribution; it does not cover a new
training seed (group runs over seeds for that: `fgdist-compare --group-by`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
LEVEL = 0.95
BLOCK_VALUES = 1 << 22  # resampled indices drawn at once at most (32 MiB of int64)


@dataclass(frozen=True)
class Difference:
    """mean(a - b) over the n queries both count, and its interval."""

    value: float
    low: float
    high: float
    n: int

    @property
    def holds_zero(self) -> bool:
        return self.low <= 0.0 <= self.high

    def __str__(self) -> str:
        return f"{self.value:+.2f} [{self.low:+.2f}, {self.high:+.2f}]"


def paired_difference(
    a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0, level: float = LEVEL
) -> Difference:
    """a and b: one value per query, the same queries in the same order; NaN where a query does not
    count (R = 0 for MAP@R: the same queries in both runs on one test set), left out."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise ValueError(f"paired values need the same queries: shapes {a.shape} and {b.shape}")
    counted = ~(np.isnan(a) | np.isnan(b))
    d = a[counted] - b[counted]
    if len(d) == 0:
        raise ValueError("no query counts in both runs: nothing to pair")
    means = resampled_means(d, resamples, seed)
    tail = 100.0 * (1.0 - level) / 2.0
    low, high = np.percentile(means, [tail, 100.0 - tail])
    return Difference(float(d.mean()), float(low), float(high), len(d))


def resampled_means(d: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    """`resamples` means of len(d) values drawn from d with replacement; blocks of resamples keep
    the index matrix under BLOCK_VALUES entries whatever the number of queries."""
    rng = np.random.default_rng(seed)
    n = len(d)
    block = max(1, BLOCK_VALUES // n)
    means = np.empty(resamples)
    for start in range(0, resamples, block):
        stop = min(start + block, resamples)
        means[start:stop] = d[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    return means


def mean_and_standard_error(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error (sample standard deviation / sqrt(k)) of k values; None for the
    error of a single value."""
    x = np.asarray(values, dtype=np.float64)
    if len(x) < 2:
        return float(x.mean()), None
    return float(x.mean()), float(x.std(ddof=1) / np.sqrt(len(x)))
