"""Live per-variant figures the canary judges by: counts and a ring of recent latencies.

Only judged outcomes (served, or failed by the server's fault) enter the live figures; a
failure the client caused is counted on /metrics alone (see ``server.routing.outcome``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from server.metrics.routing import VariantMetrics
from server.routing.outcome import Outcome

RING_SIZE = 4096


@dataclass(frozen=True, slots=True)
class Window:
    requests: int
    errors: int
    p99_ms: float

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests else 0.0


class VariantStats:
    """Written on the event loop thread only; read there too (no locks)."""

    def __init__(self, metrics: VariantMetrics) -> None:
        self.metrics = metrics
        self.requests = 0
        self.errors = 0
        self._latencies = np.zeros(RING_SIZE, dtype=np.float64)
        self._written = 0

    def record(self, seconds: float, outcome: Outcome) -> None:
        self.metrics.requests.inc()
        if outcome is Outcome.REFUSED:
            self.metrics.client_errors.inc()
            return
        self.requests += 1
        if outcome is Outcome.FAILED:
            self.errors += 1
            self.metrics.errors.inc()
            return
        self.metrics.latency.observe(seconds)
        self._latencies[self._written % RING_SIZE] = seconds
        self._written += 1

    def mark(self) -> tuple[int, int, int]:
        """A point to measure a window from (see ``since``)."""
        return self.requests, self.errors, self._written

    def since(self, mark: tuple[int, int, int]) -> Window:
        requests, errors, written = mark
        fresh = min(self._written - written, RING_SIZE)
        p99 = 0.0
        if fresh > 0:
            end = self._written % RING_SIZE
            index = (np.arange(end - fresh, end)) % RING_SIZE
            p99 = float(np.percentile(self._latencies[index], 99)) * 1000
        return Window(self.requests - requests, self.errors - errors, p99)
