"""The trace exporter's counts (--trace-config): read at scrape time, nothing written per
request."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import CounterMetricFamily, Metric
from prometheus_client.registry import Collector

#: (spans exported, dropped because the export queue was full, lost to failed exports).
SpanCounts = Callable[[], tuple[int, int, int]]


class TracingMetrics(Collector):
    def __init__(self, registry: CollectorRegistry, counts: SpanCounts) -> None:
        self._counts = counts
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        exported, dropped, failed = self._counts()
        family = CounterMetricFamily(
            "peregrine_trace_spans",
            "Spans of traced requests by outcome: exported to the collector, dropped because "
            "the export queue was full (bsp_max_queue_size), or lost to a failed export.",
            labels=("outcome",))
        family.add_metric(("exported",), exported)
        family.add_metric(("dropped",), dropped)
        family.add_metric(("failed",), failed)
        yield family
