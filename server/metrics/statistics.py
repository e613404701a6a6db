"""Cumulative per-version statistics, Triton's ModelStatistics shape.

The scheduler and dataplane add to it on the event loop thread; ModelStatistics and the
nv_* Prometheus families read it. One source for both, so they always agree.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field


def _nothing_pending() -> int:
    return 0


@dataclass(slots=True)
class Duration:
    count: int = 0
    ns: int = 0

    def add(self, ns: int, count: int = 1) -> None:
        self.count += count
        self.ns += ns


@dataclass(slots=True)
class BatchStats:
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)


@dataclass(slots=True)
class VersionStats:
    success: Duration = field(default_factory=Duration)
    fail: Duration = field(default_factory=Duration)
    queue: Duration = field(default_factory=Duration)
    compute_input: Duration = field(default_factory=Duration)
    compute_infer: Duration = field(default_factory=Duration)
    compute_output: Duration = field(default_factory=Duration)
    #: Requests answered from the response cache: the time to find and copy out each answer.
    cache_hit: Duration = field(default_factory=Duration)
    #: Requests the response cache could not answer: the time to look each up and to store
    #: its answer.
    cache_miss: Duration = field(default_factory=Duration)
    #: The version has a response cache (its nv_cache_* series are exported).
    response_cache: bool = False
    inference_count: int = 0
    execution_count: int = 0
    #: Wall-clock milliseconds since the epoch of the last inference (a timestamp, not a timer).
    last_inference_ms: int = 0
    #: Reads the scheduler's queue length when asked (a scrape), so nothing is written per
    #: request to keep a gauge current.
    pending_count: Callable[[], int] = _nothing_pending
    failures_by_reason: dict[str, int] = field(default_factory=dict)
    batches: dict[int, BatchStats] = field(default_factory=dict)

    @property
    def pending(self) -> int:
        return self.pending_count()

    def record_batch(
        self, batch_rows: int, requests: int, input_ns: int, infer_ns: int, output_ns: int
    ) -> None:
        self.execution_count += 1
        self.inference_count += batch_rows
        self.last_inference_ms = time.time_ns() // 1_000_000
        # As Triton counts them: every request of the batch spent the batch's compute time.
        self.compute_input.add(input_ns * requests, requests)
        self.compute_infer.add(infer_ns * requests, requests)
        self.compute_output.add(output_ns * requests, requests)
        per_size = self.batches.get(batch_rows)
        if per_size is None:
            per_size = self.batches[batch_rows] = BatchStats()
        per_size.compute_input.add(input_ns)
        per_size.compute_infer.add(infer_ns)
        per_size.compute_output.add(output_ns)

    def record_hit(self, lookup_ns: int, total_ns: int) -> None:
        """As Triton counts a hit: a success and a queue entry (of no wait), never an
        inference, an execution or compute time."""
        self.cache_hit.add(lookup_ns)
        self.success.add(total_ns)
        self.queue.count += 1
        self.last_inference_ms = time.time_ns() // 1_000_000

    def record_failure(self, reason: str, ns: int) -> None:
        self.fail.add(ns)
        self.failures_by_reason[reason] = self.failures_by_reason.get(reason, 0) + 1
