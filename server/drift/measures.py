"""The distance measures and tests, as plain functions over numpy arrays.

Checked against scipy in tests/unit/drift: ``ks_2samp`` computes the statistic exactly as
``scipy.stats.ks_2samp`` does, and its p-value from Smirnov's limiting distribution
(``scipy.special.kolmogorov`` of sqrt(n1 n2 / (n1 + n2)) D): a C ufunc, about 0.2 µs, where
``scipy.stats.kstwo.sf`` costs about 150 µs a call, half of a whole window's evaluation. For the
window sizes used here it is within a few per cent of scipy's exact p-value.
"""

from __future__ import annotations

import math

import numpy as np
from scipy import special

from server.types import Array

#: Floor of a bin's share in PSI: an empty bin would make the log infinite.
PSI_FLOOR = 1e-4
#: Cells whose expected count is below this are pooled for the chi-square test.
MIN_EXPECTED = 5.0


def histogram(values: Array, edges: Array) -> Array:
    """Counts per bin, bin i holding (edges[i-1], edges[i]]; len(edges) + 1 bins."""
    counts: Array = histogram_columns(values[:, np.newaxis], edges[np.newaxis, :])[0]
    return counts


def histogram_columns(values: Array, edges: Array) -> Array:
    """Per-column histograms in one pass: ``values`` [n, F] (no NaN), ``edges`` [F, K] (a
    column with fewer edges is padded with +inf, whose extra bins stay empty); returns
    counts [F, K + 1]. A value's bin is the number of its column's edges below it."""
    columns = values.shape[1]
    bins = edges.shape[1] + 1
    index = np.repeat(np.arange(columns)[np.newaxis, :] * bins, values.shape[0], axis=0)
    for k in range(edges.shape[1]):  # one pass per edge (10 bins: 9) beats a 3-D compare
        index += values > edges[:, k]
    return np.bincount(index.ravel(), minlength=columns * bins).reshape(columns, bins)


def psi(expected: Array, actual: Array, floor: float = PSI_FLOOR) -> float:
    """Population stability index of two distributions over the same bins (shares)."""
    return float(psi_rows(np.atleast_2d(expected), np.atleast_2d(actual), floor)[0])


def psi_rows(expected: Array, actual: Array, floor: float = PSI_FLOOR) -> Array:
    """PSI of each row pair (bins along the last axis; padding bins empty on both sides add 0)."""
    p = np.maximum(np.asarray(expected, dtype=np.float64), floor)
    q = np.maximum(np.asarray(actual, dtype=np.float64), floor)
    result: Array = np.sum((q - p) * np.log(q / p), axis=-1)
    return result


def js_distance(p: Array, q: Array) -> float:
    """Jensen-Shannon distance, base 2 (0 = same, 1 = disjoint)."""
    return float(js_rows(np.atleast_2d(p), np.atleast_2d(q))[0])


def js_rows(p: Array, q: Array) -> Array:
    """Jensen-Shannon distance (base 2) of each row pair; rows are normalised first."""
    p = np.asarray(p, dtype=np.float64)
    q = np.asarray(q, dtype=np.float64)
    p = p / p.sum(axis=-1, keepdims=True)
    q = q / q.sum(axis=-1, keepdims=True)
    m = (p + q) / 2.0
    divergence = (_kl_rows(p, m) + _kl_rows(q, m)) / 2.0
    result: Array = np.sqrt(np.maximum(divergence, 0.0))
    return result


def _kl_rows(p: Array, m: Array) -> Array:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log2(p / m), 0.0)
    result: Array = terms.sum(axis=-1)
    return result


def ks_2samp(live: Array, reference_sorted: Array) -> tuple[float, float]:
    """Two-sided two-sample Kolmogorov-Smirnov statistic and asymptotic p-value of one feature.

    ``reference_sorted`` must be sorted (profiles store it so). NaNs must be removed first.
    """
    if live.size == 0 or reference_sorted.size == 0:
        return math.nan, math.nan
    d, p = ks_rows(live[np.newaxis, :], reference_sorted[np.newaxis, :])
    return float(d[0]), float(p[0])


def ks_rows(live: Array, reference_sorted: Array) -> tuple[Array, Array]:
    """KS statistic and p-value per row: ``live`` [F, n] (no NaN), ``reference_sorted``
    [F, m] with each row sorted. Rows, not columns, so that every sort runs over contiguous
    memory.

    The statistic is the largest gap between the two empirical CDFs over all points of both
    samples, as scipy computes it. Two sorted runs side by side make a stable sort a linear
    merge; the running sum of +1/n (live) and -1/m (reference) steps is the CDF gap, read at
    the last of each group of equal values so that ties count once.
    """
    n = live.shape[1]
    m = reference_sorted.shape[1]
    values = np.concatenate([np.sort(live, axis=1), reference_sorted], axis=1)
    order = np.argsort(values, axis=1, kind="stable")
    ordered = np.take_along_axis(values, order, axis=1)
    gap = np.abs(np.cumsum(np.where(order < n, 1.0 / n, -1.0 / m), axis=1))
    last = np.ones(values.shape, dtype=bool)
    np.not_equal(ordered[:, 1:], ordered[:, :-1], out=last[:, :-1])
    d = np.minimum(np.where(last, gap, 0.0).max(axis=1), 1.0)
    p = np.clip(special.kolmogorov(np.sqrt(n * m / (n + m)) * d), 0.0, 1.0)
    return d, p


def chi_square(observed: Array, expected_shares: Array) -> tuple[float, float]:
    """Goodness of fit of observed counts to the reference shares.

    Cells expected to hold fewer than 5 values are pooled into one (the usual validity rule);
    a pooled cell that is still under 5 is merged into the largest cell. Shares are floored
    like PSI's so that a category the reference never saw makes a large, finite statistic.
    """
    observed = np.asarray(observed, dtype=np.float64)
    total = observed.sum()
    if total <= 0:
        return math.nan, math.nan
    shares = np.maximum(np.asarray(expected_shares, dtype=np.float64), PSI_FLOOR)
    expected = shares / shares.sum() * total
    small = expected < MIN_EXPECTED
    obs = list(observed[~small])
    exp = list(expected[~small])
    if small.any():
        pooled_obs = float(observed[small].sum())
        pooled_exp = float(expected[small].sum())
        if pooled_exp >= MIN_EXPECTED or not exp:
            obs.append(pooled_obs)
            exp.append(pooled_exp)
        else:
            largest = int(np.argmax(exp))
            obs[largest] += pooled_obs
            exp[largest] += pooled_exp
    if len(obs) < 2:
        return 0.0, 1.0
    o = np.asarray(obs)
    e = np.asarray(exp)
    statistic = float(np.sum((o - e) ** 2 / e))
    p = float(special.chdtrc(len(obs) - 1, statistic))
    return statistic, p
