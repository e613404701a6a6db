"""The Prometheus registry: our histograms plus Triton-named families for existing dashboards.

A version's series (statistics, histograms, nv_* families, readiness, load failures) live
while the repository holds the version: ``forget`` drops them when it goes, so the label sets
stay bounded however many versions come and go.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from server.metrics.histogram import LoopHistogram, LoopHistogramCollector
from server.metrics.statistics import VersionStats
from server.types import Execution

LATENCY_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0,
)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
LABELS = ("model", "version")
#: (name, help, VersionMetrics field, buckets) of the per-version histograms.
HISTOGRAMS = (
    ("peregrine_request_duration_seconds",
     "End-to-end latency of successful inference requests inside the server.",
     "request_seconds", LATENCY_BUCKETS),
    ("peregrine_queue_duration_seconds", "Time requests waited in the batcher's queue.",
     "queue_seconds", LATENCY_BUCKETS),
    ("peregrine_compute_duration_seconds", "Time to pack, execute and unpack one batch.",
     "compute_seconds", LATENCY_BUCKETS),
    ("peregrine_batch_size", "Rows per executed batch.", "batch_size", BATCH_BUCKETS),
)


@dataclass(slots=True)
class VersionMetrics:
    """The figures of one model version: Triton's statistics (ModelStatistics and the nv_*
    families read the same ``stats``) and our histograms, bound once at load.

    Implements the ModelMetrics interface; fed on the event loop thread only (LoopHistogram
    takes no lock).
    """

    stats: VersionStats
    request_seconds: LoopHistogram
    queue_seconds: LoopHistogram
    compute_seconds: LoopHistogram
    batch_size: LoopHistogram
    #: Marks the version not ready in peregrine_model_ready (bound by the registry).
    mark_unready: Callable[[], None]

    def request_failed(self, reason: str, ns: int) -> None:
        self.stats.record_failure(reason, ns)

    def count_pending(self, count: Callable[[], int]) -> None:
        self.stats.pending_count = count

    def unavailable(self) -> None:
        self.mark_unready()

    def cache_hit(self, lookup_ns: int, total_ns: int) -> None:
        self.stats.record_hit(lookup_ns, total_ns)
        self.request_seconds.observe(total_ns / 1e9)

    def cache_miss(self, ns: int) -> None:
        self.stats.cache_miss.add(ns)

    def batch_done(self, started_ns: int, finished_ns: int, enqueued_ns: Sequence[int],
                   answered_ns: Sequence[int], executions: Sequence[Execution]) -> None:
        stats = self.stats
        queue = stats.queue
        queue_seconds = self.queue_seconds
        for enqueued in enqueued_ns:
            waited = started_ns - enqueued
            queue.add(waited)
            queue_seconds.observe(waited / 1e9)
        success = stats.success
        request_seconds = self.request_seconds
        for enqueued in answered_ns:
            took = finished_ns - enqueued
            success.add(took)
            request_seconds.observe(took / 1e9)
        for run in executions:
            self.stats.record_batch(run.rows, run.requests, run.input_ns, run.infer_ns,
                                    run.output_ns)
            self.batch_size.observe(run.rows)
            self.compute_seconds.observe((run.input_ns + run.infer_ns + run.output_ns) / 1e9)


class MetricsRegistry:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self._versions: dict[tuple[str, str], VersionMetrics] = {}
        for name, documentation, field_name, _ in HISTOGRAMS:
            self.registry.register(LoopHistogramCollector(
                name, documentation, LABELS, self._children(field_name)))
        self._ready = Gauge(
            "peregrine_model_ready", "1 when the model version is ready to serve.",
            LABELS, registry=self.registry,
        )
        self._load_failures = Counter(
            "peregrine_model_load_failures",
            "Failed loads or warm-ups of a model version (version empty: the config failed).",
            LABELS, registry=self.registry,
        )
        self.registry.register(_StatsCollector(self._snapshot))

    def version(self, model: str, version: str) -> VersionMetrics:
        key = (model, version)
        found = self._versions.get(key)
        if found is None:
            found = VersionMetrics(
                stats=VersionStats(),
                mark_unready=functools.partial(self.set_ready, model, version, False),
                **{field_name: LoopHistogram(buckets)
                   for _, _, field_name, buckets in HISTOGRAMS},
            )
            self._versions[key] = found
        return found

    def set_ready(self, model: str, version: str, ready: bool) -> None:
        self._ready.labels(model, version).set(1 if ready else 0)

    def load_failed(self, model: str, version: str) -> None:
        self._load_failures.labels(model, version).inc()

    def forget(self, model: str, version: str) -> None:
        """Drop every series of a version the repository no longer holds (unloaded, or
        dropped by its version policy); version "" is the model's config failures."""
        self._versions.pop((model, version), None)
        for family in (self._ready, self._load_failures):
            with contextlib.suppress(KeyError):  # never written
                family.remove(model, version)

    def _children(self, field_name: str) -> Callable[[], list[tuple[tuple[str, str],
                                                                      LoopHistogram]]]:
        def children() -> list[tuple[tuple[str, str], LoopHistogram]]:
            return [(key, getattr(metrics, field_name))
                    for key, metrics in list(self._versions.items())]

        return children

    def _snapshot(self) -> list[tuple[str, str, VersionStats]]:
        return [(m, v, vm.stats) for (m, v), vm in list(self._versions.items())]

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def _family(name: str, doc: str, kind: str) -> Metric:
    return Metric(name, doc, kind)


class _StatsCollector(Collector):
    """Triton's metric names and labels, read from the same stats that ModelStatistics serves.

    Counters keep Triton's exact sample names (no ``_total`` suffix), so existing dashboards
    and alerts match them unchanged.
    """

    _COUNTERS: tuple[tuple[str, str, Callable[[VersionStats], int]], ...] = (
        ("nv_inference_request_success", "Successful inference requests",
         lambda s: s.success.count),
        ("nv_inference_count", "Inferences performed (a batch of n counts n)",
         lambda s: s.inference_count),
        ("nv_inference_exec_count", "Batch executions",
         lambda s: s.execution_count),
        ("nv_inference_request_duration_us", "Cumulative request duration in microseconds",
         lambda s: (s.success.ns + s.fail.ns) // 1000),
        ("nv_inference_queue_duration_us", "Cumulative queue duration in microseconds",
         lambda s: s.queue.ns // 1000),
        ("nv_inference_compute_input_duration_us",
         "Cumulative compute input duration in microseconds",
         lambda s: s.compute_input.ns // 1000),
        ("nv_inference_compute_infer_duration_us",
         "Cumulative compute inference duration in microseconds",
         lambda s: s.compute_infer.ns // 1000),
        ("nv_inference_compute_output_duration_us",
         "Cumulative compute output duration in microseconds",
         lambda s: s.compute_output.ns // 1000),
    )

    #: Only for versions with a response cache, as Triton exports them.
    _CACHE_COUNTERS: tuple[tuple[str, str, Callable[[VersionStats], int]], ...] = (
        ("nv_cache_num_hits_per_model", "Requests answered from the response cache",
         lambda s: s.cache_hit.count),
        ("nv_cache_num_misses_per_model", "Requests the response cache could not answer",
         lambda s: s.cache_miss.count),
        ("nv_cache_hit_duration_per_model",
         "Cumulative time to find and copy out cached answers, in microseconds",
         lambda s: s.cache_hit.ns // 1000),
        ("nv_cache_miss_duration_per_model",
         "Cumulative time to look up missed requests and store their answers, in "
         "microseconds", lambda s: s.cache_miss.ns // 1000),
    )

    def __init__(self, snapshot: Callable[[], list[tuple[str, str, VersionStats]]]) -> None:
        self._snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        versions = self._snapshot()
        for name, doc, read in self._COUNTERS:
            family = _family(name, doc, "counter")
            for model, version, stats in versions:
                family.add_sample(name, {"model": model, "version": version}, read(stats))
            yield family
        failures = _family(
            "nv_inference_request_failure", "Failed inference requests", "counter"
        )
        for model, version, stats in versions:
            for reason in ("REJECTED", "CANCELED", "BACKEND", "OTHER"):
                failures.add_sample(
                    "nv_inference_request_failure",
                    {"model": model, "version": version, "reason": reason},
                    stats.failures_by_reason.get(reason, 0),
                )
        yield failures
        pending = _family(
            "nv_inference_pending_request_count", "Requests queued, not yet executing", "gauge"
        )
        for model, version, stats in versions:
            pending.add_sample(
                "nv_inference_pending_request_count",
                {"model": model, "version": version}, stats.pending,
            )
        yield pending
        cached = [(model, version, stats) for model, version, stats in versions
                  if stats.response_cache]
        for name, doc, read in self._CACHE_COUNTERS:
            family = _family(name, doc, "counter")
            for model, version, stats in cached:
                family.add_sample(name, {"model": model, "version": version}, read(stats))
            yield family
