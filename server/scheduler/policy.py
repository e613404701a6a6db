"""Batch formation, as a pure function of the queue's front and the clock.

Rules (Triton's dynamic batcher, with our eager default):
- rows count, not requests: a request of batch 4 fills 4 of ``max_batch_size``;
- a batch closes where the per-row shape changes (they cannot be concatenated);
- a full batch, or one cut by a shape change, goes at once;
- with no queue delay configured, whatever is queued goes as soon as an instance is free,
  so an idle server adds no waiting and batches grow while another batch runs;
- with a delay, a batch goes when it reaches the largest preferred size it can, or when its
  oldest request has waited the delay; until then the caller re-evaluates at the returned time;
- a ragged batch closes before a request that would make it mostly padding: padded, each
  ragged input holds at most MAX_PAD_RATIO times the elements its requests carry (or
  PAD_SLACK_ELEMENTS, whichever is more), so requests of very different extents go in
  separate batches and no batch pads past a bound;
- the delay is an upper bound, not a toll: once requests stop arriving (``arriving`` false:
  the caller's last look found no newcomer), waiting would only add latency (one request at a
  time, say), so the batch goes at once. Triton's fixed delay is the caller passing
  ``arriving=True`` always.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

#: A request's extents of its ragged inputs: per ragged input, its dims after the batch dim.
#: None for a model without ragged inputs.
Extents = tuple[tuple[int, ...], ...]
#: A padded ragged input holds at most this many times the elements its requests carry...
MAX_PAD_RATIO = 2
#: ... or this many elements, whichever is more (padding a small batch costs nothing).
PAD_SLACK_ELEMENTS = 1 << 16


@dataclass(frozen=True, slots=True)
class Decision:
    #: Requests to take from the front of the queue now; 0 means wait.
    take: int
    #: When waiting, the perf_counter_ns time at which to decide again.
    wait_until_ns: int | None = None


WAIT_FOR_ARRIVALS = Decision(take=0)


def decide(
    front: Iterable[tuple[int, Hashable, Extents | None]],
    *,
    oldest_enqueue_ns: int,
    now_ns: int,
    batching: bool,
    max_batch_size: int,
    preferred_sizes: frozenset[int],
    max_delay_ns: int,
    arriving: bool = True,
) -> Decision:
    """Decide how many requests to dispatch from ``front``: (rows, shape signature, ragged
    extents) of each queued request, in dispatch order."""
    if not batching:
        for _ in front:
            return Decision(take=1)
        return WAIT_FOR_ARRIVALS

    total = 0
    taken = 0
    preferred_taken = 0
    closed = False
    first_signature: Hashable = None
    padding: _Padding | None = None
    for rows, signature, extents in front:
        if taken == 0:
            first_signature = signature
            if extents is not None:
                padding = _Padding(rows, extents)
        elif signature != first_signature or total + rows > max_batch_size or (
                padding is not None and extents is not None and not padding.add(rows, extents)):
            closed = True
            break
        total += rows
        taken += 1
        if total in preferred_sizes:
            preferred_taken = taken
        if total >= max_batch_size:
            closed = True
            break

    if taken == 0:
        return WAIT_FOR_ARRIVALS
    if closed or max_delay_ns <= 0:
        return Decision(take=taken)
    if preferred_taken:
        return Decision(take=preferred_taken)
    deadline = oldest_enqueue_ns + max_delay_ns
    if now_ns >= deadline or not arriving:
        return Decision(take=taken)
    return Decision(take=0, wait_until_ns=deadline)


class _Padding:
    """The rows, largest extents and carried elements of each ragged input of a batch being
    formed (only for models with ragged inputs)."""

    __slots__ = ("carried", "largest", "rows")

    def __init__(self, rows: int, extents: Extents) -> None:
        self.rows = rows
        self.largest = extents
        self.carried = tuple(rows * math.prod(dims) for dims in extents)

    def add(self, rows: int, extents: Extents) -> bool:
        """Take a request into the batch, unless padding would exceed the bound."""
        total = self.rows + rows
        largest = tuple(tuple(map(max, mine, theirs))
                        for mine, theirs in zip(self.largest, extents, strict=True))
        carried = tuple(before + rows * math.prod(dims)
                        for before, dims in zip(self.carried, extents, strict=True))
        for dims, real in zip(largest, carried, strict=True):
            if total * math.prod(dims) > max(MAX_PAD_RATIO * real, PAD_SLACK_ELEMENTS):
                return False
        self.rows, self.largest, self.carried = total, largest, carried
        return True


#: The most input bytes a batch run on the event loop may carry. The time a batch takes is
#: learned per row count, and one row can be tiny or huge (variable dims, long strings): a
#: huge request after a run of tiny ones must not inherit their prediction and stall the loop.
INLINE_MAX_BYTES = 64 * 1024


class InlineCost:
    """Whether a batch is cheap enough to run on the event loop thread.

    Handing a batch to a worker thread and back costs tens of microseconds; a model that
    answers in less than that is faster run where the request already is. The prediction is a
    moving average of the CPU time batches of the same row count took (the executing thread's
    CPU time: wall time in a worker thread that shares its core with the loop counts the
    loop's turns too, and would keep a cheap model off the loop for ever); an unseen size, or
    one that became slow, goes to the worker thread, and so does any batch of more than
    ``max_bytes`` of inputs, whatever its prediction.
    """

    SMOOTHING = 0.2

    def __init__(self, inline_max_ns: int, max_bytes: int = INLINE_MAX_BYTES) -> None:
        self.inline_max_ns = inline_max_ns
        self.max_bytes = max_bytes
        self._expected_ns: dict[int, float] = {}

    def runs_inline(self, rows: int, input_bytes: Callable[[], int]) -> bool:
        """``input_bytes`` is asked only of a batch predicted cheap."""
        expected = self._expected_ns.get(rows)
        return (expected is not None and expected < self.inline_max_ns
                and input_bytes() <= self.max_bytes)

    def observe(self, rows: int, elapsed_ns: int) -> None:
        previous = self._expected_ns.get(rows)
        self._expected_ns[rows] = (
            float(elapsed_ns) if previous is None
            else previous + self.SMOOTHING * (elapsed_ns - previous)
        )


class QueueWait:
    """The wait a new request would have before its batch starts, predicted from what is
    queued ahead of it and how fast the version's instances have been draining rows.

    The drain rate is a moving average of each batch's wall time per row (dispatch to answer,
    the thread hand-off included) over the instances; under load, batches are full and the
    average is the service time that matters. Before any batch has run nothing is predicted
    (nothing is refused).
    """

    SMOOTHING = 0.2

    def __init__(self, bound_ns: int, instances: int) -> None:
        self.bound_ns = bound_ns
        self._instances = max(1, instances)
        self._ns_per_row: float | None = None

    def observe(self, rows: int, wall_ns: int) -> None:
        if rows <= 0:
            return
        sample = wall_ns / rows / self._instances
        previous = self._ns_per_row
        self._ns_per_row = (sample if previous is None
                            else previous + self.SMOOTHING * (sample - previous))

    def predict_ns(self, queued_rows: int) -> float:
        return 0.0 if self._ns_per_row is None else queued_rows * self._ns_per_row
