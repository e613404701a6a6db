"""Counters of refused calls: authentication and authorization refusals by status, rate-limit
refusals by identity and model (labels from the auth file and --model-rate-limit only, so
their number is bounded whatever clients send)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter


class SecurityMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self._refused = Counter(
            "peregrine_auth_refused", "Calls refused by authentication or authorization.",
            ("code",), registry=registry)
        self._limited = Counter(
            "peregrine_rate_limited", "Requests refused by a rate limit (model is empty "
            "unless the model has a limit of its own).", ("identity", "model"),
            registry=registry)

    def refused(self, code: str) -> None:
        self._refused.labels(code).inc()

    def rate_limited(self, identity: str, model: str) -> None:
        self._limited.labels(identity, model).inc()
