"""The latency histogram against numpy on known data."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from bench.loadgen.histogram import HIGHEST_NS, PERCENTILES, LatencyHistogram

# HdrHistogram with 3 significant digits: every value is reported within 0.1% (bucket width).
RELATIVE = 1e-3


def numpy_percentile(values: np.ndarray, percentile: float) -> float:
    """The smallest value with at least p% of the values at or below it (HdrHistogram's and
    numpy's 'inverted_cdf' definition). The rank is computed exactly: numpy's own
    ``np.percentile(..., method="inverted_cdf")`` computes 0.999 * 20000 in floating point,
    gets 19980.000000000004 and so takes the 19981st value."""
    rank = max(1, math.ceil(Fraction(str(percentile)) * values.size / 100))
    return float(np.sort(values)[rank - 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_percentiles_match_numpy_on_lognormal_latencies(seed: int) -> None:
    rng = np.random.default_rng(seed)
    values = (rng.lognormal(mean=13.0, sigma=0.8, size=20_000)).astype(np.int64)  # ~0.4 ms
    histogram = LatencyHistogram()
    histogram.record_many(int(v) for v in values)
    assert histogram.count == values.size
    for _, percentile in PERCENTILES:
        expected = numpy_percentile(values, percentile)
        assert histogram.percentile_ns(percentile) == pytest.approx(expected, rel=RELATIVE)
    assert histogram.max_ns() == pytest.approx(values.max(), rel=RELATIVE)
    assert histogram.min_ns() == pytest.approx(values.min(), rel=RELATIVE)
    assert histogram.mean_ns() == pytest.approx(values.mean(), rel=RELATIVE)


def test_exact_on_small_integers() -> None:
    histogram = LatencyHistogram()
    histogram.record_many(range(1, 1001))  # 1..1000 ns: below 2048, buckets are 1 ns wide
    assert histogram.percentile_ns(50.0) == 500
    assert histogram.percentile_ns(99.0) == 990
    assert histogram.percentile_ns(99.9) == 999
    assert histogram.max_ns() == 1000


def test_summary_is_in_milliseconds() -> None:
    histogram = LatencyHistogram()
    histogram.record_many([1_000_000] * 10)
    summary = histogram.summary_ms()
    assert set(summary) == {"p50", "p90", "p99", "p99.9", "max", "min", "mean"}
    assert summary["p50"] == pytest.approx(1.0, rel=RELATIVE)


def test_merge_through_encoding_equals_recording_everything() -> None:
    rng = np.random.default_rng(7)
    parts = [rng.integers(50_000, 5_000_000, size=3_000) for _ in range(3)]
    whole = LatencyHistogram()
    whole.record_many(int(v) for v in np.concatenate(parts))
    encoded = []
    for part in parts:
        histogram = LatencyHistogram()
        histogram.record_many(int(v) for v in part)
        encoded.append(histogram.encode())
    merged = LatencyHistogram.merged([LatencyHistogram.decode(e) for e in encoded])
    assert merged.count == whole.count
    for _, percentile in PERCENTILES:
        assert merged.percentile_ns(percentile) == whole.percentile_ns(percentile)
    assert merged.max_ns() == whole.max_ns()


def test_empty_histogram_reports_zeros_and_round_trips() -> None:
    empty = LatencyHistogram()
    assert empty.count == 0
    assert empty.summary_ms()["p99"] == 0.0
    assert empty.encode() == ""
    assert LatencyHistogram.decode("").count == 0
    assert empty.cdf_ms() == []


def test_out_of_range_values_are_clamped() -> None:
    histogram = LatencyHistogram()
    histogram.record(0)
    histogram.record(HIGHEST_NS * 10)
    assert histogram.count == 2
    assert histogram.max_ns() == pytest.approx(HIGHEST_NS, rel=RELATIVE)


def test_cdf_is_monotonic_and_ends_at_one() -> None:
    histogram = LatencyHistogram()
    values = np.random.default_rng(3).integers(100_000, 10_000_000, 5000)
    histogram.record_many(int(v) for v in values)
    points = histogram.cdf_ms(points=50)
    assert len(points) <= 60
    latencies = [p[0] for p in points]
    fractions = [p[1] for p in points]
    assert latencies == sorted(latencies)
    assert fractions == sorted(fractions)
    assert fractions[-1] == pytest.approx(1.0)
