"""How late the event loop runs: ``peregrine_event_loop_lag_seconds``.

Everything the server does per request runs on one event loop thread, so anything that holds
it (a batch run inline that turned out big, a slow callback) delays every call, ServerLive
included. A timer due every ``interval`` seconds records how late it fired: the cost is one
timer per interval, nothing per request. uvloop's timers have millisecond resolution, so an
idle loop shows lags under a millisecond or two.
"""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from server.metrics.histogram import LoopHistogram, LoopHistogramCollector

INTERVAL_S = 0.1
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
NAME = "peregrine_event_loop_lag_seconds"


class LoopLag:
    """The histogram and the timer feeding it; the timer runs between ``start`` and ``stop``."""

    def __init__(self, registry: CollectorRegistry, interval_s: float = INTERVAL_S) -> None:
        self.histogram = LoopHistogram(BUCKETS)
        self._interval_s = interval_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._due = 0.0
        self._handle: asyncio.TimerHandle | None = None
        registry.register(LoopHistogramCollector(
            NAME, "How late the event loop ran a timer due every "
            f"{interval_s:g} s: the time every request waited for the loop then.",
            (), lambda: [((), self.histogram)]))

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._arm(loop.time())

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _arm(self, now: float) -> None:
        assert self._loop is not None
        self._due = now + self._interval_s
        self._handle = self._loop.call_at(self._due, self._tick)

    def _tick(self) -> None:
        assert self._loop is not None
        now = self._loop.time()
        self.histogram.observe(max(0.0, now - self._due))
        self._arm(now)
