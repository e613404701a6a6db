"""server.scheduler.queue.RequestQueue: priority levels, admission bounds, removal, expiry."""

from __future__ import annotations

import asyncio
from types import MappingProxyType

import numpy as np
import pytest

from server.errors import BoundExceeded, Overloaded
from server.scheduler.queue import PendingRequest, RequestQueue
from server.spec import (
    MIN_QUEUE_SIZE,
    QUEUED_BATCHES,
    BatchingSpec,
    InstanceSpec,
    ModelSpec,
    QueuePolicy,
)
from server.types import DataType, InferRequest, InferResponse


def batching(
    levels: int = 0,
    default_level: int = 0,
    default_policy: QueuePolicy | None = None,
    per_level: dict[int, QueuePolicy] | None = None,
) -> BatchingSpec:
    return BatchingSpec(
        enabled=True,
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_policy=default_policy or QueuePolicy(),
        priority_queue_policy=MappingProxyType(dict(per_level or {})),
    )


def entry(
    name: str, level: int = 1, enqueue_ns: int = 0, deadline_ns: int | None = None, rows: int = 1
) -> PendingRequest:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[InferResponse] = loop.create_future()
    request = InferRequest(
        model_name="m", model_version="1", id=name,
        inputs={"INPUT0": np.zeros((rows, 4), dtype=np.float32)},
        input_types={"INPUT0": DataType.FP32},
    )
    return PendingRequest(
        request=request, rows=rows, signature=(("INPUT0", (4,)),), level=level,
        enqueue_ns=enqueue_ns, deadline_ns=deadline_ns, future=future,
    )


def ids(entries: list[PendingRequest]) -> list[str]:
    return [e.request.id for e in entries]


# -- levels ----------------------------------------------------------------------------------------


def test_without_priority_levels_there_is_one_level() -> None:
    queue = RequestQueue(batching())
    assert queue.levels == 1
    assert queue.level_for(0) == 1


def test_level_for_uses_the_configured_default() -> None:
    queue = RequestQueue(batching(levels=4, default_level=3))
    assert queue.levels == 4
    assert queue.level_for(0) == 3
    assert queue.level_for(1) == 1
    assert queue.level_for(4) == 4


def test_level_for_without_a_default_picks_the_middle_level() -> None:
    assert RequestQueue(batching(levels=3)).level_for(0) == 2
    assert RequestQueue(batching(levels=4)).level_for(0) == 2
    assert RequestQueue(batching(levels=1)).level_for(0) == 1


async def test_front_is_priority_first_then_arrival() -> None:
    queue = RequestQueue(batching(levels=3, default_level=2))
    for name, level in [("low1", 3), ("mid1", 2), ("high1", 1), ("low2", 3), ("high2", 1),
                        ("mid2", 2)]:
        queue.push(entry(name, level))
    assert len(queue) == 6
    assert ids(list(queue.front())) == ["high1", "high2", "mid1", "mid2", "low1", "low2"]
    oldest = queue.oldest()
    assert oldest is not None and oldest.request.id == "high1"


async def test_oldest_is_the_head_of_the_highest_non_empty_level() -> None:
    queue = RequestQueue(batching(levels=2, default_level=2))
    assert queue.oldest() is None
    queue.push(entry("low", 2, enqueue_ns=1))
    first = queue.oldest()
    assert first is not None and first.request.id == "low"
    queue.push(entry("high", 1, enqueue_ns=5))
    head = queue.oldest()
    assert head is not None and head.request.id == "high"


# -- pop -------------------------------------------------------------------------------------------


async def test_pop_crosses_levels_in_dispatch_order() -> None:
    queue = RequestQueue(batching(levels=3, default_level=2))
    pushed = [entry("l3a", 3), entry("l1a", 1), entry("l2a", 2), entry("l1b", 1),
              entry("l3b", 3)]
    for e in pushed:
        queue.push(e)
    first = queue.pop(3)
    assert ids(first) == ["l1a", "l1b", "l2a"]
    assert all(not e.queued for e in first)
    assert len(queue) == 2
    assert ids(list(queue.front())) == ["l3a", "l3b"]
    rest = queue.pop(10)
    assert ids(rest) == ["l3a", "l3b"]
    assert len(queue) == 0
    assert queue.pop(1) == []
    assert queue.oldest() is None


async def test_pop_zero_takes_nothing() -> None:
    queue = RequestQueue(batching())
    queue.push(entry("a"))
    assert queue.pop(0) == []
    assert len(queue) == 1


async def test_drain_all_empties_every_level() -> None:
    queue = RequestQueue(batching(levels=2, default_level=1))
    queue.push(entry("b", 2))
    queue.push(entry("a", 1))
    assert ids(queue.drain_all()) == ["a", "b"]
    assert len(queue) == 0


# -- admission bounds ------------------------------------------------------------------------------


async def test_default_bound_applies_to_each_level() -> None:
    queue = RequestQueue(batching(levels=2, default_level=2,
                                  default_policy=QueuePolicy(max_queue_size=2)))
    queue.push(entry("a", 2))
    queue.push(entry("b", 2))
    with pytest.raises(Overloaded) as caught:
        queue.push(entry("c", 2))
    assert "full" in str(caught.value) and "priority 2" in str(caught.value)
    assert caught.value.code.name == "RESOURCE_EXHAUSTED"
    # The other level has a bound of its own and still admits.
    queue.push(entry("d", 1))
    queue.push(entry("e", 1))
    with pytest.raises(Overloaded):
        queue.push(entry("f", 1))
    assert len(queue) == 4
    assert ids(list(queue.front())) == ["d", "e", "a", "b"]


async def test_per_level_policy_overrides_the_default_bound() -> None:
    queue = RequestQueue(batching(
        levels=2, default_level=2,
        default_policy=QueuePolicy(max_queue_size=1),
        per_level={1: QueuePolicy(max_queue_size=3)},
    ))
    for name in ("h1", "h2", "h3"):
        queue.push(entry(name, 1))
    with pytest.raises(Overloaded):
        queue.push(entry("h4", 1))
    queue.push(entry("l1", 2))
    with pytest.raises(Overloaded):
        queue.push(entry("l2", 2))
    assert len(queue) == 4


async def test_bound_counts_requests_and_frees_on_pop() -> None:
    queue = RequestQueue(batching(default_policy=QueuePolicy(max_queue_size=1)))
    queue.push(entry("big", rows=8))
    with pytest.raises(Overloaded):
        queue.push(entry("small", rows=1))
    queue.pop(1)
    queue.push(entry("small", rows=1))
    assert len(queue) == 1


async def test_zero_bound_is_unbounded() -> None:
    queue = RequestQueue(batching(default_policy=QueuePolicy(max_queue_size=0)))
    for i in range(500):
        queue.push(entry(str(i)))
    assert len(queue) == 500


async def test_a_level_without_a_bound_takes_the_default_bound() -> None:
    queue = RequestQueue(batching(levels=2, default_level=2,
                                  per_level={1: QueuePolicy(max_queue_size=3)}), 2)
    for name in ("a", "b", "c"):
        queue.push(entry(name, 1))  # its own bound, not the default
    queue.push(entry("d", 2))
    queue.push(entry("e", 2))
    with pytest.raises(BoundExceeded) as refused:
        queue.push(entry("f", 2))
    assert refused.value.bound == "max_queue_size"
    assert refused.value.message == ("queue of model 'm' is full (2 requests at priority 2, "
                                     "max_queue_size)")


@pytest.mark.parametrize(("max_batch_size", "instances", "bound"), [
    (0, 1, MIN_QUEUE_SIZE),  # no batching: the floor
    (8, 1, MIN_QUEUE_SIZE),  # 64 < the floor
    (64, 2, QUEUED_BATCHES * 64 * 2),
])
def test_the_default_queue_bound_holds_full_batches_per_instance(
    max_batch_size: int, instances: int, bound: int
) -> None:
    spec = ModelSpec("m", "onnxruntime_onnx", "onnxruntime", max_batch_size, (), (),
                     instances=(InstanceSpec("CPU", instances),))
    assert spec.default_max_queue_size == bound


async def test_rejected_push_leaves_the_queue_unchanged() -> None:
    queue = RequestQueue(batching(default_policy=QueuePolicy(max_queue_size=1)))
    queue.push(entry("a"))
    rejected = entry("b")
    with pytest.raises(Overloaded):
        queue.push(rejected)
    assert len(queue) == 1
    assert ids(list(queue.front())) == ["a"]


# -- remove ----------------------------------------------------------------------------------------


async def test_remove_takes_out_one_entry() -> None:
    queue = RequestQueue(batching(levels=2, default_level=2))
    a, b, c = entry("a", 2), entry("b", 1), entry("c", 2)
    for e in (a, b, c):
        queue.push(e)
    queue.remove(a)
    assert not a.queued
    assert len(queue) == 2
    assert ids(list(queue.front())) == ["b", "c"]


async def test_remove_is_idempotent_and_ignores_popped_entries() -> None:
    queue = RequestQueue(batching())
    a, b = entry("a"), entry("b")
    queue.push(a)
    queue.push(b)
    queue.remove(a)
    queue.remove(a)
    assert len(queue) == 1
    (popped,) = queue.pop(1)
    queue.remove(popped)
    assert len(queue) == 0


async def test_removal_frees_room_under_the_bound() -> None:
    queue = RequestQueue(batching(default_policy=QueuePolicy(max_queue_size=1)))
    a = entry("a")
    queue.push(a)
    queue.remove(a)
    queue.push(entry("b"))
    assert len(queue) == 1


# -- remove_expired --------------------------------------------------------------------------------


async def test_remove_expired_drops_past_deadlines_only() -> None:
    queue = RequestQueue(batching(levels=2, default_level=2))
    keep_none = entry("no-deadline", 2, deadline_ns=None)
    keep_later = entry("later", 1, deadline_ns=2_000)
    gone_at = entry("at-now", 2, deadline_ns=1_000)
    gone_before = entry("before", 1, deadline_ns=500)
    for e in (keep_none, keep_later, gone_at, gone_before):
        queue.push(e)
    dropped = queue.remove_expired(1_000)
    assert sorted(ids(dropped)) == ["at-now", "before"]
    assert all(not e.queued for e in dropped)
    assert len(queue) == 2
    assert ids(list(queue.front())) == ["later", "no-deadline"]
    # The dropped futures are left for the caller to fail.
    assert not gone_at.future.done()


async def test_remove_expired_drops_done_and_cancelled_futures() -> None:
    queue = RequestQueue(batching())
    cancelled, answered, waiting = entry("cancelled"), entry("answered"), entry("waiting")
    for e in (cancelled, answered, waiting):
        queue.push(e)
    cancelled.future.cancel()
    answered.future.set_exception(RuntimeError("someone else answered"))
    answered.future.exception()  # retrieved, so asyncio does not warn about it
    dropped = queue.remove_expired(0)
    assert sorted(ids(dropped)) == ["answered", "cancelled"]
    assert ids(list(queue.front())) == ["waiting"]
    assert len(queue) == 1


async def test_remove_expired_keeps_order_of_survivors() -> None:
    queue = RequestQueue(batching())
    entries = [entry(str(i), deadline_ns=(100 if i % 2 else None)) for i in range(6)]
    for e in entries:
        queue.push(e)
    queue.remove_expired(100)
    assert ids(list(queue.front())) == ["0", "2", "4"]
    assert ids(queue.pop(3)) == ["0", "2", "4"]


async def test_remove_expired_with_nothing_expired_changes_nothing() -> None:
    queue = RequestQueue(batching())
    queue.push(entry("a", deadline_ns=10))
    assert queue.remove_expired(9) == []
    assert len(queue) == 1


async def test_the_queue_counts_the_rows_of_its_requests_whatever_takes_them_out() -> None:
    queue = RequestQueue(batching(levels=2))
    first, second, third = entry("a", rows=3), entry("b", level=2, rows=2), entry("c", rows=5)
    expiring = entry("d", rows=4, deadline_ns=10)
    for queued in (first, second, third, expiring):
        queue.push(queued)
    assert queue.rows == 14
    queue.pop(1)
    assert queue.rows == 11
    queue.remove(second)
    assert queue.rows == 9
    queue.remove_expired(now_ns=20)
    assert queue.rows == 5
    queue.drain_all()
    assert queue.rows == 0
