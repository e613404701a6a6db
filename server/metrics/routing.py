"""Metrics of traffic routing: per variant, per shadow, per canary.

Series live as long as what they describe: a variant's go when a table without it replaces
its table (or the table is cleared), a shadow's when the shadow goes, so label sets stay
bounded however often tables change.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from server.metrics.registry import LATENCY_BUCKETS

ROUTE_LABELS = ("model", "variant")


@dataclass(slots=True)
class VariantMetrics:
    requests: Counter
    errors: Counter
    client_errors: Counter
    latency: Histogram


@dataclass(slots=True)
class ShadowMetrics:
    mirrored: Counter
    dropped: Counter
    failed: Counter
    agreement: Gauge
    max_abs_diff: Gauge
    mean_abs_diff: Gauge


class RoutingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._requests = Counter(
            "peregrine_route_requests", "Requests routed to a variant.", ROUTE_LABELS,
            registry=registry,
        )
        self._errors = Counter(
            "peregrine_route_errors",
            "Routed requests that failed by the server's fault (INTERNAL, UNAVAILABLE, a "
            "server timeout): what a canary judges.", ROUTE_LABELS, registry=registry,
        )
        self._client_errors = Counter(
            "peregrine_route_client_errors",
            "Routed requests that failed by the client's doing (invalid, refused, "
            "rate-limited, cancelled, past its own deadline): never judged.", ROUTE_LABELS,
            registry=registry,
        )
        self._latency = Histogram(
            "peregrine_route_latency_seconds", "Latency of routed requests inside the server.",
            ROUTE_LABELS, buckets=LATENCY_BUCKETS, registry=registry,
        )
        self._weight = Gauge(
            "peregrine_route_weight", "Current weight of a variant.", ROUTE_LABELS,
            registry=registry,
        )
        self._mirrored = Counter(
            "peregrine_shadow_mirrored", "Requests copied to the shadow variant.",
            ROUTE_LABELS, registry=registry,
        )
        self._dropped = Counter(
            "peregrine_shadow_dropped", "Shadow copies dropped because its queue was full.",
            ROUTE_LABELS, registry=registry,
        )
        self._failed = Counter(
            "peregrine_shadow_failed", "Shadow copies that failed (never seen by callers).",
            ROUTE_LABELS, registry=registry,
        )
        self._agreement = Gauge(
            "peregrine_shadow_agreement",
            "Share of compared class outputs on which shadow and primary agree.",
            ROUTE_LABELS, registry=registry,
        )
        self._max_abs = Gauge(
            "peregrine_shadow_max_abs_diff",
            "Largest absolute difference between shadow and primary float outputs.",
            ROUTE_LABELS, registry=registry,
        )
        self._mean_abs = Gauge(
            "peregrine_shadow_mean_abs_diff",
            "Mean absolute difference between shadow and primary float outputs.",
            ROUTE_LABELS, registry=registry,
        )
        self._canary_step = Gauge(
            "peregrine_canary_weight_percent",
            "Candidate weight of a running canary, in percent.", ("model",),
            registry=registry,
        )

    def variant(self, model: str, variant: str) -> VariantMetrics:
        return VariantMetrics(
            requests=self._requests.labels(model, variant),
            errors=self._errors.labels(model, variant),
            client_errors=self._client_errors.labels(model, variant),
            latency=self._latency.labels(model, variant),
        )

    def shadow(self, model: str, variant: str) -> ShadowMetrics:
        return ShadowMetrics(
            mirrored=self._mirrored.labels(model, variant),
            dropped=self._dropped.labels(model, variant),
            failed=self._failed.labels(model, variant),
            agreement=self._agreement.labels(model, variant),
            max_abs_diff=self._max_abs.labels(model, variant),
            mean_abs_diff=self._mean_abs.labels(model, variant),
        )

    def set_weight(self, model: str, variant: str, weight: float) -> None:
        self._weight.labels(model, variant).set(weight)

    def set_canary(self, model: str, percent: float) -> None:
        self._canary_step.labels(model).set(percent)

    def forget_variant(self, model: str, variant: str) -> None:
        """Drop every series of a variant no longer in the model's table."""
        _remove((self._requests, self._errors, self._client_errors, self._latency,
                 self._weight), model, variant)

    def forget_shadow(self, model: str, variant: str) -> None:
        _remove((self._mirrored, self._dropped, self._failed, self._agreement, self._max_abs,
                 self._mean_abs), model, variant)

    def forget_canary(self, model: str) -> None:
        _remove((self._canary_step,), model)


def _remove(families: Iterable[Counter | Gauge | Histogram], *labels: str) -> None:
    for family in families:
        with contextlib.suppress(KeyError):  # never written
            family.remove(*labels)
