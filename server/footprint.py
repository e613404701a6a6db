"""The memory tensors hold, for the queues that bound themselves in bytes (shadow copies,
drift samples): a count alone would let a few huge requests hold any amount of memory."""

from __future__ import annotations

from collections.abc import Iterable

from server.types import Array, OutputTensor


def array_bytes(array: Array) -> int:
    """Bytes ``array`` holds: its buffer, plus each item of a BYTES (object) array."""
    if array.dtype.kind != "O":
        return int(array.nbytes)
    return int(array.nbytes) + sum(len(item) for item in array.flat
                                   if isinstance(item, bytes | str))


def arrays_bytes(arrays: Iterable[Array]) -> int:
    return sum(array_bytes(array) for array in arrays)


def outputs_bytes(outputs: Iterable[OutputTensor]) -> int:
    """Bytes of a response's outputs, without making an array of a raw one."""
    return sum(len(out.raw) if out.raw is not None else array_bytes(out.data)
               for out in outputs)
