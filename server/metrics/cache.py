"""The response cache's store as a whole (the per-model nv_cache_* families are in
registry.py): read at scrape time, nothing written per request."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from server.cache.store import CacheStore


class CacheMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, store: CacheStore) -> None:
        self._store = store
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        store = self._store
        yield GaugeMetricFamily(
            "peregrine_response_cache_bytes",
            "Bytes the response cache's entries count for (bound: --cache-config size).",
            value=store.used_bytes)
        yield GaugeMetricFamily(
            "peregrine_response_cache_capacity_bytes",
            "The response cache's size (--cache-config local,size=N).",
            value=store.capacity_bytes)
        yield GaugeMetricFamily(
            "peregrine_response_cache_entries", "Answers held by the response cache.",
            value=len(store))
        yield CounterMetricFamily(
            "peregrine_response_cache_evictions",
            "Answers pushed out of the response cache to make room for newer ones.",
            value=store.evictions)
