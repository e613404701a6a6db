"""The per-version request queue: priority levels, admission bounds and deadlines."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Hashable, Iterator
from dataclasses import dataclass, field

from server.errors import BoundExceeded
from server.scheduler.policy import Extents
from server.spec import BatchingSpec
from server.types import InferRequest, InferResponse


@dataclass(slots=True, eq=False)
class PendingRequest:
    request: InferRequest
    rows: int
    signature: Hashable
    level: int
    enqueue_ns: int
    #: perf_counter_ns deadline, or None for no deadline.
    deadline_ns: int | None
    future: asyncio.Future[InferResponse] = field(repr=False)
    queued: bool = True
    #: Its ragged inputs' extents (the policy bounds padding with them); None: no ragged input.
    extents: Extents | None = None


class RequestQueue:
    """FIFO per priority level (1 is the highest); bounded per level by its queue policy's
    ``max_queue_size``, or ``default_bound`` where that is 0 (0 too: unbounded).

    Only the event loop thread touches it, so it takes no locks.
    """

    def __init__(self, batching: BatchingSpec, default_bound: int = 0) -> None:
        self._levels = max(1, batching.priority_levels)
        self._default_level = batching.default_priority_level or (
            (self._levels + 1) // 2 if batching.priority_levels else 1
        )
        self._bounds = [
            batching.queue_policy(level).max_queue_size or default_bound
            for level in range(1, self._levels + 1)
        ]
        self._queues: list[deque[PendingRequest]] = [deque() for _ in range(self._levels)]
        self._size = 0
        #: Rows of the queued requests (a request's batch dimension; 1 when it has none).
        self.rows = 0

    @property
    def levels(self) -> int:
        return self._levels

    def level_for(self, priority: int) -> int:
        """Map a request's priority (0 = model default) to a queue level, validated by caller."""
        return priority if priority else self._default_level

    def __len__(self) -> int:
        return self._size

    def push(self, entry: PendingRequest) -> None:
        index = entry.level - 1
        bound = self._bounds[index]
        queue = self._queues[index]
        if bound and len(queue) >= bound:
            raise BoundExceeded(
                "max_queue_size",
                f"queue of model '{entry.request.model_name}' is full "
                f"({bound} requests at priority {entry.level}, max_queue_size)"
            )
        queue.append(entry)
        self._size += 1
        self.rows += entry.rows

    def front(self) -> Iterator[PendingRequest]:
        """Queued requests in dispatch order: highest priority first, then arrival."""
        for queue in self._queues:
            yield from queue

    def oldest(self) -> PendingRequest | None:
        for queue in self._queues:
            if queue:
                return queue[0]
        return None

    def pop(self, count: int) -> list[PendingRequest]:
        taken: list[PendingRequest] = []
        for queue in self._queues:
            while queue and len(taken) < count:
                entry = queue.popleft()
                entry.queued = False
                taken.append(entry)
                self.rows -= entry.rows
        self._size -= len(taken)
        return taken

    def remove(self, entry: PendingRequest) -> None:
        if not entry.queued:
            return
        self._queues[entry.level - 1].remove(entry)
        entry.queued = False
        self._size -= 1
        self.rows -= entry.rows

    def remove_expired(self, now_ns: int) -> list[PendingRequest]:
        """Take out every request whose deadline has passed or whose caller went away."""
        dropped: list[PendingRequest] = []
        for queue in self._queues:
            if not any(e.future.done() or _expired(e, now_ns) for e in queue):
                continue
            kept: deque[PendingRequest] = deque()
            for entry in queue:
                if entry.future.done() or _expired(entry, now_ns):
                    entry.queued = False
                    dropped.append(entry)
                    self.rows -= entry.rows
                else:
                    kept.append(entry)
            queue.clear()
            queue.extend(kept)
        self._size -= len(dropped)
        return dropped

    def drain_all(self) -> list[PendingRequest]:
        return self.pop(self._size)


def _expired(entry: PendingRequest, now_ns: int) -> bool:
    return entry.deadline_ns is not None and now_ns >= entry.deadline_ns
