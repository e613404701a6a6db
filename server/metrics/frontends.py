"""The frontend processes' own figures on the engine's one /metrics endpoint.

With ``--frontends N`` the gRPC work runs in N processes the engine's /metrics cannot see
into. Each frontend sends a STATS frame every ``STATS_INTERVAL_S`` (its CPU time, resident
memory, event-loop lag histogram and the bytes its request arena holds, `FrontendStats`); the
engine keeps the latest per frontend slot (1..N: a restarted frontend takes its predecessor's
slot, so the label set stays N wide) and this collector writes them at scrape time: nothing
per request on either side.
"""

from __future__ import annotations

import os
import resource
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from server.metrics.histogram import LoopHistogram
from server.metrics.loop_lag import BUCKETS

#: How often a frontend reports.
STATS_INTERVAL_S = 1.0
_PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True, slots=True)
class FrontendStats:
    """One frontend's figures at one moment (a STATS frame's body, as a tuple)."""

    pid: int
    cpu_seconds: float
    resident_bytes: int
    #: The loop-lag histogram: counts per bucket of loop_lag.BUCKETS (and +Inf), and the sum.
    lag_counts: tuple[int, ...]
    lag_sum: float
    #: Bytes of request messages in the frontend's arena that the engine has not freed.
    arena_bytes: int

    @classmethod
    def of_this_process(cls, lag: LoopHistogram, arena_bytes: int) -> FrontendStats:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        with open("/proc/self/statm", "rb") as statm:
            resident_pages = int(statm.read().split()[1])
        return cls(os.getpid(), usage.ru_utime + usage.ru_stime, resident_pages * _PAGE,
                   tuple(lag.counts), lag.sum, arena_bytes)

    def as_tuple(self) -> tuple[int, float, int, tuple[int, ...], float, int]:
        return (self.pid, self.cpu_seconds, self.resident_bytes, self.lag_counts,
                self.lag_sum, self.arena_bytes)

    @classmethod
    def from_tuple(cls, values: tuple[object, ...]) -> FrontendStats:
        """From a frame's head; ValueError when it is not a FrontendStats."""
        pid, cpu, resident, counts, lag_sum, arena = values
        if not (isinstance(pid, int) and isinstance(cpu, float) and isinstance(resident, int)
                and isinstance(counts, tuple) and len(counts) == len(BUCKETS) + 1
                and all(isinstance(c, int) for c in counts) and isinstance(lag_sum, float)
                and isinstance(arena, int)):
            raise ValueError("not a frontend's stats")
        return cls(pid, cpu, resident, counts, lag_sum, arena)


class FrontendMetrics(Collector):
    """``peregrine_frontend_*`` from the latest stats of each frontend slot, and the
    restarts."""

    def __init__(self, registry: CollectorRegistry,
                 latest: Callable[[], Mapping[int, FrontendStats]],
                 restarts: Callable[[], int]) -> None:
        self._latest = latest
        self._restarts = restarts
        registry.register(self)

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "peregrine_frontend_cpu_seconds", "CPU time (user and system) of each frontend "
            "process since it started.", labels=["frontend"])
        resident = GaugeMetricFamily(
            "peregrine_frontend_resident_memory_bytes",
            "Resident memory of each frontend process.", labels=["frontend"])
        lag = HistogramMetricFamily(
            "peregrine_frontend_event_loop_lag_seconds",
            "How late each frontend's event loop ran a timer: the time every call it took "
            "waited for its loop then.", labels=["frontend"])
        arena = GaugeMetricFamily(
            "peregrine_frontend_arena_bytes",
            "Bytes of large requests in each frontend's request arena that the engine has "
            "not finished with (bounded by --frontend-arena-bytes).", labels=["frontend"])
        histogram = LoopHistogram(BUCKETS)
        for slot, stats in sorted(self._latest().items()):
            label = [str(slot)]
            cpu.add_metric(label, stats.cpu_seconds)
            resident.add_metric(label, stats.resident_bytes)
            arena.add_metric(label, stats.arena_bytes)
            histogram.counts = list(stats.lag_counts)
            histogram.sum = stats.lag_sum
            lag.add_metric(label, histogram.cumulative(), stats.lag_sum)
        restarts = CounterMetricFamily(
            "peregrine_frontend_restarts", "Frontend processes started in place of one that "
            "died.")
        restarts.add_metric([], self._restarts())
        yield from (cpu, resident, arena, lag, restarts)
