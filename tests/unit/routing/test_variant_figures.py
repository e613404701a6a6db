"""server.routing.figures.VariantStats: counts and recent-latency windows per variant."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.metrics.routing import RoutingMetrics
from server.routing.figures import RING_SIZE, VariantStats
from server.routing.outcome import Outcome


@pytest.fixture
def registry() -> CollectorRegistry:
    return CollectorRegistry()


@pytest.fixture
def stats(registry: CollectorRegistry) -> VariantStats:
    return VariantStats(RoutingMetrics(registry).variant("m", "a"))


def sample(registry: CollectorRegistry, name: str) -> float | None:
    value: float | None = registry.get_sample_value(name, {"model": "m", "variant": "a"})
    return value


def test_counts_and_metrics(stats: VariantStats, registry: CollectorRegistry) -> None:
    for _ in range(3):
        stats.record(0.010, Outcome.OK)
    stats.record(0.500, Outcome.FAILED)
    assert (stats.requests, stats.errors) == (4, 1)
    assert sample(registry, "peregrine_route_requests_total") == 4
    assert sample(registry, "peregrine_route_errors_total") == 1
    # Failures count as errors, not as latencies.
    assert sample(registry, "peregrine_route_latency_seconds_count") == 3


def test_the_clients_failures_are_counted_apart_and_never_judged(
    stats: VariantStats, registry: CollectorRegistry,
) -> None:
    mark = stats.mark()
    stats.record(0.010, Outcome.OK)
    for _ in range(50):
        stats.record(0.001, Outcome.REFUSED)
    window = stats.since(mark)
    assert (window.requests, window.errors) == (1, 0)
    assert sample(registry, "peregrine_route_requests_total") == 51
    assert sample(registry, "peregrine_route_client_errors_total") == 50
    assert sample(registry, "peregrine_route_errors_total") == 0


def test_window_since_a_mark(stats: VariantStats) -> None:
    for _ in range(100):
        stats.record(0.001, Outcome.OK)
    mark = stats.mark()
    assert stats.since(mark).requests == 0 and stats.since(mark).p99_ms == 0.0
    for i in range(100):
        stats.record(0.002 if i < 98 else 0.050, Outcome.OK)
    stats.record(1.0, Outcome.FAILED)
    window = stats.since(mark)
    assert window.requests == 101 and window.errors == 1
    assert window.error_rate == pytest.approx(1 / 101)
    # Only the window's latencies count: 1 ms ones from before the mark do not.
    assert 2.0 < window.p99_ms <= 50.0
    assert stats.since((0, 0, 0)).requests == 201


def test_the_window_keeps_the_most_recent_ring(stats: VariantStats) -> None:
    mark = stats.mark()
    for _ in range(RING_SIZE):
        stats.record(1.0, Outcome.OK)
    for _ in range(RING_SIZE):
        stats.record(0.001, Outcome.OK)  # overwrites every slow one
    window = stats.since(mark)
    assert window.requests == 2 * RING_SIZE
    assert window.p99_ms == pytest.approx(1.0)
