"""Our PSI, KS, chi-square and Jensen-Shannon against scipy and a plain numpy PSI."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats
from scipy.spatial.distance import jensenshannon

from server.drift import measures


def numpy_psi(reference: np.ndarray, live: np.ndarray, bins: int = 10) -> float:
    """The textbook PSI: reference deciles as bins, shares floored to avoid log(0)."""
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, bins + 1)[1:-1]))
    edges = np.concatenate([[-np.inf], inner, [np.inf]])
    # (a, b] bins, like the reference implementation: histogram of the negated values.
    ref_counts = np.histogram(-reference, bins=-edges[::-1])[0][::-1]
    live_counts = np.histogram(-live, bins=-edges[::-1])[0][::-1]
    p = np.maximum(ref_counts / reference.size, measures.PSI_FLOOR)
    q = np.maximum(live_counts / live.size, measures.PSI_FLOOR)
    return float(np.sum((q - p) * np.log(q / p)))


@pytest.mark.parametrize(("n_live", "n_ref", "shift", "scale", "rounded"), [
    (500, 2000, 0.0, 1.0, False),
    (1000, 2000, 0.1, 1.0, False),
    (200, 2000, 0.3, 1.0, False),
    (2000, 2000, 0.0, 1.3, False),
    (1000, 2000, 0.2, 1.0, True),  # many ties
    (50, 300, 0.5, 1.0, False),
])
def test_ks_matches_scipy(rng: np.random.Generator, n_live: int, n_ref: int, shift: float,
                          scale: float, rounded: bool) -> None:
    for _ in range(5):
        live = rng.normal(shift, scale, n_live)
        ref = rng.normal(0.0, 1.0, n_ref)
        if rounded:
            live, ref = np.round(live * 2), np.round(ref * 2)
        d, p = measures.ks_2samp(live, np.sort(ref))
        expected = scipy_stats.ks_2samp(live, ref)  # exact p-value at these sizes
        assert d == pytest.approx(expected.statistic, abs=1e-12)
        assert p == pytest.approx(expected.pvalue, rel=0.15, abs=2e-3)


def test_ks_of_an_empty_sample_is_nan() -> None:
    d, p = measures.ks_2samp(np.empty(0), np.arange(3.0))
    assert np.isnan(d) and np.isnan(p)


@pytest.mark.parametrize("shift", [0.0, 0.1, 0.5, 2.0])
def test_psi_matches_a_plain_numpy_psi(rng: np.random.Generator, shift: float) -> None:
    reference = rng.normal(size=20_000)
    live = rng.normal(shift, 1.0, 1000)
    inner = np.unique(np.quantile(reference, np.linspace(0, 1, 11)[1:-1]))
    expected = measures.histogram(reference, inner) / reference.size
    actual = measures.histogram(live, inner) / live.size
    assert measures.psi(expected, actual) == pytest.approx(numpy_psi(reference, live), rel=1e-9)


def test_psi_grows_with_the_shift(rng: np.random.Generator) -> None:
    reference = rng.normal(size=20_000)
    values = [numpy_psi(reference, rng.normal(s, 1.0, 5000)) for s in (0.0, 0.25, 0.5, 1.0)]
    assert values == sorted(values)
    assert values[0] < 0.01 and values[2] > 0.1


def test_histogram_bins_are_closed_on_the_right() -> None:
    counts = measures.histogram(np.array([-1.0, 0.0, 0.5, 1.0, 2.0, np.inf]), np.array([0.0, 1.0]))
    assert counts.tolist() == [2, 2, 2]


def test_js_distance_matches_scipy(rng: np.random.Generator) -> None:
    for _ in range(10):
        p = rng.random(10)
        q = rng.random(10)
        q[3] = 0.0
        assert measures.js_distance(p, q) == pytest.approx(jensenshannon(p, q, base=2), abs=1e-12)
    assert measures.js_distance(np.array([1.0, 0.0]), np.array([0.0, 1.0])) == pytest.approx(1.0)


def test_chi_square_matches_scipy_when_no_cell_is_pooled(rng: np.random.Generator) -> None:
    shares = np.array([0.4, 0.3, 0.2, 0.1])
    observed = rng.multinomial(500, [0.35, 0.3, 0.2, 0.15])
    statistic, p = measures.chi_square(observed, shares)
    expected = scipy_stats.chisquare(observed, shares * 500)
    assert statistic == pytest.approx(expected.statistic)
    assert p == pytest.approx(expected.pvalue)


def test_chi_square_pools_rare_cells() -> None:
    shares = np.array([0.5, 0.49, 0.004, 0.003, 0.003])
    observed = np.array([250, 245, 2, 2, 1])
    statistic, p = measures.chi_square(observed, shares)
    # Rare cells (expected 1.5 to 2 values each) are pooled into one of expected 5.
    pooled = scipy_stats.chisquare([250, 245, 5], np.array([0.5, 0.49, 0.01]) * 500)
    assert statistic == pytest.approx(pooled.statistic)
    assert p == pytest.approx(pooled.pvalue)
