"""peregrine_event_loop_lag_seconds: a timer on the loop records how late it ran."""

from __future__ import annotations

import asyncio
import time

from prometheus_client import CollectorRegistry, generate_latest

from server.metrics.loop_lag import NAME, LoopLag


async def test_a_blocked_loop_shows_up_as_lag_and_stop_ends_the_timer() -> None:
    registry = CollectorRegistry()
    lag = LoopLag(registry, interval_s=0.01)
    loop = asyncio.get_running_loop()
    lag.start(loop)
    await asyncio.sleep(0.05)
    quiet = sum(lag.histogram.counts)
    assert quiet >= 1
    time.sleep(0.3)  # noqa: ASYNC251 -- hold the loop, as a big batch run inline would
    await asyncio.sleep(0.05)
    # The tick due during the block ran at least 0.25 s late: counted above the 0.25 bucket.
    above = lag.histogram.counts[lag.histogram.bounds.index(0.25) + 1:]
    assert sum(above) == 1
    assert lag.histogram.sum >= 0.25

    lag.stop()
    stopped = sum(lag.histogram.counts)
    await asyncio.sleep(0.05)
    assert sum(lag.histogram.counts) == stopped
    exposition = generate_latest(registry).decode()
    assert f"{NAME}_count {float(stopped)}" in exposition
