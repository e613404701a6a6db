"""A fixed-capacity ring between the event loop (producer) and the analyser (consumer),
bounded in items and, optionally, in the bytes they hold.

Why not ``collections.deque(maxlen=...)``: it silently evicts the oldest item when full, so
nobody would know samples were lost. This ring refuses the new item instead and counts it.

Why no lock: there is exactly one producer (the event loop thread) and one consumer (the
analyser thread). The producer only ever advances ``_head`` after writing the slot; the
consumer only advances ``_tail`` after clearing it. Each of those is a single attribute store,
atomic under the GIL, so neither side can see the other's half-done step and neither waits.
The byte count works the same way: the producer alone adds to ``_bytes_in``, the consumer
alone to ``_bytes_out``; a stale read only ever overstates what the ring holds (a drop, never
an overrun).
``push`` is a handful of bytecodes: measured at about 0.1 µs (see bench/drift_overhead.py),
far below a request's cost, so it stays in Python rather than native code.
"""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class SampleRing(Generic[T]):
    __slots__ = ("_bytes_in", "_bytes_out", "_capacity", "_head", "_max_bytes", "_sizes",
                 "_slots", "_tail", "dropped", "pushed")

    def __init__(self, capacity: int, max_bytes: int | None = None) -> None:
        """``max_bytes``: what the items waiting may hold together (None: no bound)."""
        if capacity <= 0:
            raise ValueError("a ring needs a positive capacity")
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._slots: list[T | None] = [None] * capacity
        self._sizes = [0] * capacity
        self._head = 0  # written by the producer only
        self._tail = 0  # written by the consumer only
        self._bytes_in = 0  # written by the producer only
        self._bytes_out = 0  # written by the consumer only
        self.pushed = 0
        self.dropped = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def __len__(self) -> int:
        return self._head - self._tail

    @property
    def nbytes(self) -> int:
        """Bytes the waiting items hold (as their producer counted them)."""
        return self._bytes_in - self._bytes_out

    def push(self, item: T, nbytes: int = 0) -> bool:
        """Producer side. Never blocks: False (and one more ``dropped``) when full, in items
        or in bytes (``nbytes``: what ``item`` holds)."""
        head = self._head
        limit = self._max_bytes
        if head - self._tail >= self._capacity or (
            limit is not None and self._bytes_in - self._bytes_out + nbytes > limit
        ):
            self.dropped += 1
            return False
        index = head % self._capacity
        self._slots[index] = item
        self._sizes[index] = nbytes
        self._bytes_in += nbytes
        self._head = head + 1
        self.pushed += 1
        return True

    def drain(self, limit: int | None = None) -> list[T]:
        """Consumer side: take up to ``limit`` items (all by default), oldest first."""
        tail = self._tail
        head = self._head
        if limit is not None:
            head = min(head, tail + limit)
        slots = self._slots
        sizes = self._sizes
        capacity = self._capacity
        taken: list[T] = []
        freed = 0
        while tail < head:
            index = tail % capacity
            item = slots[index]
            slots[index] = None
            freed += sizes[index]
            taken.append(item)  # type: ignore[arg-type]  # filled: tail < head
            tail += 1
        self._bytes_out += freed
        self._tail = tail
        return taken
