"""A frontend's figures cross the process boundary whole, and anything else is refused."""

from __future__ import annotations

import os

import pytest

from server.metrics.frontends import FrontendStats
from server.metrics.histogram import LoopHistogram
from server.metrics.loop_lag import BUCKETS
from server.multiproc.frames import decode_head, encode_head


def test_this_processs_figures_read_back_as_sent() -> None:
    lag = LoopHistogram(BUCKETS)
    lag.observe(0.003)
    stats = FrontendStats.of_this_process(lag, arena_bytes=4096)
    assert stats.pid == os.getpid()
    assert stats.resident_bytes > 1 << 20 and stats.cpu_seconds > 0
    assert sum(stats.lag_counts) == 1 and stats.lag_sum == pytest.approx(0.003)
    assert stats.arena_bytes == 4096
    assert FrontendStats.from_tuple(decode_head(encode_head(stats.as_tuple()), 6)) == stats


@pytest.mark.parametrize("values", [
    (1, 0.5, 100, (0,) * 3, 0.0, 0),  # the wrong number of buckets
    ("1", 0.5, 100, (0,) * (len(BUCKETS) + 1), 0.0, 0),  # a pid that is no number
    (1, 0.5, 100, (0.5,) * (len(BUCKETS) + 1), 0.0, 0),  # counts that are no counts
    (1, 0.5, 100, (0,) * (len(BUCKETS) + 1), 0.0, 0.5),  # arena bytes that are no count
])
def test_anything_else_is_refused(values: tuple[object, ...]) -> None:
    with pytest.raises(ValueError):
        FrontendStats.from_tuple(values)
