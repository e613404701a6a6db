"""Drift monitoring's Prometheus families.

Gauges are set by the drift analyser thread after each evaluated window (``window`` label:
``sliding`` for the last N rows, ``fixed`` for the last completed tumbling window). The
sample and drop counters are plain integers that the hot path bumps without a lock; they are
read at scrape time through ``count_from``, as are the analyser's own figures (CPU time,
heartbeat, restarts). A version's gauges go when it is no longer
monitored (``forget``), so label sets stay bounded over loads and unloads.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

FEATURE_LABELS = ("model", "version", "feature", "window")
MODEL_LABELS = ("model", "version", "window")


@dataclass(frozen=True, slots=True)
class DriftCounts:
    model: str
    version: str
    #: Samples taken into the ring.
    samples: int
    #: Samples dropped because the ring was full.
    ring_full: int
    #: Samples dropped because the version has no reference profile yet.
    no_profile: int


class AnalyserFigures(Protocol):
    """What the drift analyser exports about itself (server.drift.analyser.DriftAnalyser)."""

    cpu_seconds: float
    #: Wall-clock end of its last completed pass (0 before the first).
    heartbeat: float
    restarts: int


class DriftMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        def gauge(name: str, doc: str, labels: tuple[str, ...] = FEATURE_LABELS) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        self._psi = gauge("peregrine_drift_psi",
                          "Population stability index of a feature against the reference.")
        self._ks = gauge("peregrine_drift_ks_pvalue",
                         "Two-sample Kolmogorov-Smirnov p-value of a numeric feature.")
        self._chi2 = gauge("peregrine_drift_chi2_pvalue",
                           "Chi-square p-value of a categorical feature.")
        self._js = gauge("peregrine_drift_js_distance",
                         "Jensen-Shannon distance (base 2) of a prediction's distribution.")
        self._missing = gauge("peregrine_drift_missing_rate", "Share of NaN/missing values.")
        self._range = gauge(
            "peregrine_drift_out_of_range_rate",
            "Share of values outside the reference [min, max], or of unseen categories.",
        )
        self._level_feature = gauge("peregrine_drift_feature_level",
                                    "Drift level of a feature: 0 ok, 1 warning, 2 alert.")
        self._feature_gauges = (self._psi, self._ks, self._chi2, self._js, self._missing,
                                self._range, self._level_feature)
        self._score = gauge("peregrine_drift_score",
                            "Drift score of a model version: its largest feature PSI.",
                            MODEL_LABELS)
        self._level = gauge("peregrine_drift_alert_level",
                            "Drift level of a model version: 0 ok, 1 warning, 2 alert.",
                            MODEL_LABELS)
        self._rows = gauge("peregrine_drift_window_rows", "Rows in the evaluated window.",
                           MODEL_LABELS)
        self._retrain = Counter(
            "peregrine_retrain_hook_runs",
            "Runs of the retrain hook (--retrain-command / --retrain-url) by outcome: ok, "
            "failed (non-zero exit or HTTP status), timeout, error (could not start or "
            "connect), dropped (too many waiting).",
            ("model", "version", "outcome"), registry=registry)
        self._counts = _CountsCollector()
        registry.register(self._counts)
        #: The (feature, window) and window labels set per (model, version), to forget them.
        self._features: dict[tuple[str, str], set[tuple[str, str]]] = {}
        self._windows: dict[tuple[str, str], set[str]] = {}

    def set_feature(
        self, model: str, version: str, window: str, feature: str, *, psi: float,
        ks_pvalue: float, chi2_pvalue: float, js: float, missing_rate: float,
        out_of_range: float, level: int,
    ) -> None:
        labels = (model, version, feature, window)
        self._features.setdefault((model, version), set()).add((feature, window))
        for gauge, value in (
            (self._psi, psi), (self._ks, ks_pvalue), (self._chi2, chi2_pvalue),
            (self._js, js), (self._missing, missing_rate), (self._range, out_of_range),
            (self._level_feature, float(level)),
        ):
            if not math.isnan(value):  # a measure that does not apply makes no series
                gauge.labels(*labels).set(value)

    def set_model(self, model: str, version: str, window: str, *, score: float, level: int,
                  rows: int) -> None:
        self._windows.setdefault((model, version), set()).add(window)
        self._score.labels(model, version, window).set(score)
        self._level.labels(model, version, window).set(level)
        self._rows.labels(model, version, window).set(rows)

    def retrain_run(self, model: str, version: str, outcome: str) -> None:
        self._retrain.labels(model, version, outcome).inc()

    def forget(self, model: str, version: str) -> None:
        """Drop every gauge of a version no longer monitored (no longer served)."""
        for feature, window in self._features.pop((model, version), set()):
            _remove(self._feature_gauges, model, version, feature, window)
        for window in self._windows.pop((model, version), set()):
            _remove((self._score, self._level, self._rows), model, version, window)

    def count_from(self, source: Callable[[], Iterable[DriftCounts]],
                   analyser: AnalyserFigures) -> None:
        self._counts.source = source
        self._counts.analyser = analyser


def _remove(gauges: Iterable[Gauge], *labels: str) -> None:
    for gauge in gauges:
        with contextlib.suppress(KeyError):  # never set (a measure that does not apply)
            gauge.remove(*labels)


class _CountsCollector(Collector):
    def __init__(self) -> None:
        self.source: Callable[[], Iterable[DriftCounts]] = lambda: ()
        self.analyser: AnalyserFigures | None = None

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        counts = list(self.source())
        samples = CounterMetricFamily(
            "peregrine_drift_samples", "Requests sampled for drift analysis.",
            labels=("model", "version"),
        )
        dropped = CounterMetricFamily(
            "peregrine_drift_dropped",
            "Samples dropped: ring_full (the analyser fell behind) or no_profile.",
            labels=("model", "version", "reason"),
        )
        for c in counts:
            samples.add_metric((c.model, c.version), c.samples)
            dropped.add_metric((c.model, c.version, "ring_full"), c.ring_full)
            dropped.add_metric((c.model, c.version, "no_profile"), c.no_profile)
        yield samples
        yield dropped
        analyser = self.analyser
        if analyser is None:
            return
        yield CounterMetricFamily(
            "peregrine_drift_analyser_cpu_seconds",
            "CPU time used by the drift analyser thread (windows, tests, sample store).",
            value=analyser.cpu_seconds,
        )
        yield GaugeMetricFamily(
            "peregrine_drift_analyser_heartbeat_timestamp_seconds",
            "When the drift analyser last completed a pass (Unix time; it passes several "
            "times a second): one that stops moving is stalled or keeps dying.",
            value=analyser.heartbeat,
        )
        yield CounterMetricFamily(
            "peregrine_drift_analyser_restarts",
            "Drift analyser threads restarted after the previous one died.",
            value=analyser.restarts,
        )
