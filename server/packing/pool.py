"""Reusable host buffers for one model version's batch inputs.

Thread-safety: lock-free, relying on the atomicity of ``list.pop`` and ``list.append``
(single operations on one list under the GIL; per-object locks in free-threaded CPython).
A batch takes one buffer per input and gives it back when its context exits, so batches
running at once on a version's backend instances (one executor thread each) never share a
buffer. A free list holds at most as many buffers as batches ever ran at once; one that is
too small for the batch in hand is dropped and replaced by a larger one, so each list
settles at the largest batch's size, up to ``retain_bytes``: a larger buffer serves its batch
and is dropped, so one huge batch does not hold its memory for ever (allocating that much
costs little beside filling it).

Pinned memory (for a GPU backend) is the allocator's business: pass an ``Allocator`` that
returns page-locked host memory (e.g. over cudaHostAlloc) and everything else stays as is.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from server.types import Array

#: Returns a writeable 1-D uint8 array of at least ``nbytes`` bytes, aligned to ALIGNMENT.
Allocator = Callable[[int], Array]

#: Buffer alignment: a cache line, enough for every dtype and SIMD load.
ALIGNMENT = 64
#: The smallest buffer allocated; larger ones are rounded up to a power of two.
MIN_CAPACITY = 4096
#: The largest buffer a pool keeps for reuse by default.
RETAIN_BYTES = 64 * 1024 * 1024


def host_allocator(nbytes: int) -> Array:
    """Plain (pageable) host memory, ALIGNMENT-aligned."""
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start:start + nbytes]


def capacity_for(nbytes: int) -> int:
    return max(MIN_CAPACITY, 1 << max(0, nbytes - 1).bit_length())


class BufferPool:
    """Free lists of batch buffers, one per key (an input name of one model version)."""

    def __init__(self, allocator: Allocator = host_allocator,
                 retain_bytes: int = RETAIN_BYTES) -> None:
        self._allocate = allocator
        self._retain_bytes = retain_bytes
        self._free: dict[str, list[Array]] = {}
        self.allocations = 0  # buffers ever allocated: tests and diagnostics

    def take(self, key: str, dtype: np.dtype[Any], shape: tuple[int, ...]) -> tuple[Array, Array]:
        """(buffer, view): a pooled buffer and a C-contiguous ``dtype`` array of ``shape`` over
        its start. Give the buffer back with ``give`` once nothing reads the view."""
        count = 1
        for d in shape:
            count *= d
        nbytes = count * dtype.itemsize
        free = self._free.get(key)
        buffer: Array | None = None
        if free:
            try:
                buffer = free.pop()
            except IndexError:  # another thread took the last one
                buffer = None
        if buffer is None or buffer.nbytes < nbytes:
            buffer = self._allocate(capacity_for(nbytes))
            self.allocations += 1
        return buffer, buffer[:nbytes].view(dtype).reshape(shape)

    def give(self, key: str, buffer: Array) -> None:
        if buffer.nbytes > self._retain_bytes:
            return
        free = self._free.get(key)
        if free is None:
            free = self._free.setdefault(key, [])
        free.append(buffer)

    def free_buffers(self, key: str) -> int:
        return len(self._free.get(key, ()))

    def retained_bytes(self) -> int:
        """Bytes of the buffers kept for reuse (tests and diagnostics)."""
        return sum(b.nbytes for free in list(self._free.values()) for b in list(free))
