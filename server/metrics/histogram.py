"""Histograms written by the event loop thread alone: no lock on the request path.

prometheus_client's Histogram takes a mutex on every observe, so it works from any thread.
Ours are fed only on the event loop (the batcher and the dataplane run there), so a plain
list of bucket counts does, and a collector turns them into Prometheus histogram families
when /metrics is scraped (on another thread, reading under the GIL). A scrape that lands
between the two updates of one observation may count it in a bucket a moment before it is
in the sum; both only grow.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import cast

from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

#: How prometheus_client writes a bucket's ``le`` ("0.0001", "1.0", "+Inf"): the same labels
#: as its own Histogram, so dashboards see no change.
_le = cast(Callable[[float], str], floatToGoString)


class LoopHistogram:
    """Bucket counts (``value <= bound``, plus +Inf) and the sum of what was observed."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(float(b) for b in bounds)
        if list(self.bounds) != sorted(set(self.bounds)):
            raise ValueError(f"bucket bounds must increase: {list(bounds)}")
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs, +Inf last, as Prometheus exposes buckets."""
        total = 0
        buckets = []
        for bound, count in zip((*self.bounds, float("inf")), list(self.counts), strict=True):
            total += count
            buckets.append((_le(bound), float(total)))
        return buckets


class LoopHistogramCollector(Collector):
    """One Prometheus histogram family from the LoopHistograms of every label set."""

    def __init__(self, name: str, documentation: str, labels: Sequence[str],
                 children: Callable[[], Iterable[tuple[Sequence[str], LoopHistogram]]]) -> None:
        self._name = name
        self._documentation = documentation
        self._labels = list(labels)
        self._children = children

    def describe(self) -> Iterable[Metric]:
        return [HistogramMetricFamily(self._name, self._documentation, labels=self._labels)]

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self._name, self._documentation, labels=self._labels)
        for values, histogram in self._children():
            family.add_metric(list(values), histogram.cumulative(), histogram.sum)
        yield family
