"""LoopHistogram exposes exactly what prometheus_client's own Histogram would for the same
observations (its le labels, cumulative buckets, count and sum), without its lock."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from server.metrics.histogram import LoopHistogram, LoopHistogramCollector
from server.metrics.registry import LATENCY_BUCKETS, MetricsRegistry


def samples(registry: CollectorRegistry, name: str) -> dict[tuple[object, ...], float]:
    text = generate_latest(registry).decode()
    found: dict[tuple[object, ...], float] = {}
    for family in text_string_to_metric_families(text):
        if family.name != name:
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue  # prometheus_client's creation timestamp: not a measurement
            found[(sample.name, *sorted(sample.labels.items()))] = sample.value
    return found


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(st.sampled_from([*LATENCY_BUCKETS, 0.0, 20.0]),
                          st.floats(0, 20, allow_nan=False)), max_size=40))
def test_exposition_matches_prometheus_client(values: list[float]) -> None:
    theirs = CollectorRegistry()
    reference = Histogram("h_seconds", "doc", ["model"], buckets=LATENCY_BUCKETS,
                          registry=theirs).labels("m")
    ours = CollectorRegistry()
    histogram = LoopHistogram(LATENCY_BUCKETS)
    ours.register(LoopHistogramCollector("h_seconds", "doc", ["model"],
                                         lambda: [(("m",), histogram)]))
    for value in values:
        reference.observe(value)
        histogram.observe(value)
    want = samples(theirs, "h_seconds")
    got = samples(ours, "h_seconds")
    assert got.keys() == want.keys()
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_bounds_must_increase() -> None:
    with pytest.raises(ValueError, match="increase"):
        LoopHistogram((1.0, 0.5))


def test_registry_exposes_each_version_histogram() -> None:
    registry = MetricsRegistry()
    metrics = registry.version("m", "1")
    metrics.request_seconds.observe(0.002)
    metrics.batch_size.observe(8)
    text = registry.exposition().decode()
    assert 'peregrine_request_duration_seconds_count{model="m",version="1"} 1.0' in text
    assert 'peregrine_batch_size_bucket{le="8.0",model="m",version="1"} 1.0' in text
    assert 'peregrine_queue_duration_seconds_count{model="m",version="1"} 0.0' in text
    assert registry.version("m", "1") is metrics
