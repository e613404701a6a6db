"""The compiled packer: gathers request tensors with one memcpy each into pooled batch
buffers, runs declared preprocessing in native threads straight into the batch buffer, and
slices outputs straight into per-request ``bytes``.

Python work per batch is per input and per output, not per request, except for building
the list of request tensors and the per-request response tensors. BYTES tensors (Python
objects) keep the numpy object-array path of the reference.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext

import numpy as np

from server import _native
from server.interfaces import ModelPacker
from server.packing.pool import Allocator, BufferPool, host_allocator
from server.packing.reference import ragged_pad_element
from server.preprocess import native_preprocessor
from server.spec import ModelSpec
from server.types import Array, DataType, InferRequest, OutputTensor


class PackedBatch(AbstractContextManager[Mapping[str, Array]]):
    """A batch's inputs; its pooled buffers go back to the pool when the context exits."""

    __slots__ = ("_pool", "_taken", "inputs")

    def __init__(self, inputs: dict[str, Array], pool: BufferPool,
                 taken: list[tuple[str, Array]]) -> None:
        self.inputs = inputs
        self._pool = pool
        self._taken = taken

    def __enter__(self) -> Mapping[str, Array]:
        return self.inputs

    def __exit__(self, *exc: object) -> None:
        taken, self._taken = self._taken, []
        for key, buffer in taken:
            self._pool.give(key, buffer)
        self.inputs = {}


class NativeModelPacker:
    """Packing of one model version; safe to call from several executor threads at once."""

    def __init__(self, spec: ModelSpec, allocator: Allocator = host_allocator) -> None:
        self._batches = spec.batches
        self._pool = BufferPool(allocator)
        #: (name, numpy dtype, is BYTES) of every input, in config order.
        self._inputs = [(t.name, t.datatype.numpy_dtype, t.datatype is DataType.BYTES)
                        for t in spec.inputs]
        self._outputs = [(t.name, t.datatype, t.datatype.numpy_dtype, t.scatter_like)
                         for t in spec.outputs]
        #: Ragged input -> its pad value as one element's bytes.
        self._pads = {t.name: ragged_pad_element(t).tobytes() for t in spec.inputs if t.ragged}
        pre = spec.preprocess
        self._pre_name: str | None = None
        self._pre_shape: tuple[int, ...] = ()
        if pre is not None:
            model_input = spec.input(pre.input)
            assert model_input is not None  # ModelSpec checked it
            self._pre_name = pre.input
            self._pre_dtype = model_input.datatype.numpy_dtype
            self._pre_shape = model_input.dims
            self._preprocessor = native_preprocessor(pre, model_input)

    @property
    def pool(self) -> BufferPool:
        return self._pool

    def pack(
        self, requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> AbstractContextManager[Mapping[str, Array]]:
        if len(requests) == 1:
            return self.pack_rows(requests[0].inputs)
        first = requests[0].inputs
        pool = self._pool
        taken: list[tuple[str, Array]] = []
        batch: dict[str, Array] = {}
        total = sum(rows)
        try:
            for name, dtype, is_bytes in self._inputs:
                value = first.get(name)
                if value is None:
                    continue  # an optional input this batch does not carry
                if name == self._pre_name:
                    shape = (total, *self._pre_shape) if self._batches else self._pre_shape
                    buffer, out = pool.take(name, self._pre_dtype, shape)
                    taken.append((name, buffer))
                    self._preprocessor.run([r.inputs[name] for r in requests], out,
                                           self._batches)
                elif name in self._pads and (inner := padded_inner(
                        [r.inputs[name] for r in requests])) is not None:
                    buffer, out = pool.take(name, dtype, (total, *inner))
                    taken.append((name, buffer))
                    _native.gather_padded([r.inputs[name] for r in requests], out,
                                          self._pads[name])
                elif is_bytes:
                    out = np.concatenate([r.inputs[name] for r in requests], axis=0)
                else:
                    buffer, out = pool.take(name, dtype, (total, *value.shape[1:]))
                    taken.append((name, buffer))
                    _native.gather([r.inputs[name] for r in requests], out)
                batch[name] = out
        except BaseException:
            for key, buffer in taken:
                pool.give(key, buffer)
            raise
        return PackedBatch(batch, pool, taken)

    def pack_rows(self, inputs: Mapping[str, Array]) -> AbstractContextManager[Mapping[str, Array]]:
        pre = self._pre_name
        if pre is None or pre not in inputs:
            # The arrays are the batch (zero-copy views over the wire bytes or a file's rows;
            # validated, so only declared inputs).
            return nullcontext(inputs)
        images = inputs[pre]
        shape = (len(images), *self._pre_shape) if self._batches else self._pre_shape
        buffer, out = self._pool.take(pre, self._pre_dtype, shape)
        try:
            self._preprocessor.run([images], out, self._batches)
        except BaseException:
            self._pool.give(pre, buffer)
            raise
        batch = {name: out if name == pre else inputs[name] for name, _, _ in self._inputs
                 if name in inputs}
        return PackedBatch(batch, self._pool, [(pre, buffer)])

    def unpack(
        self, outputs: Mapping[str, Array], requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> list[dict[str, OutputTensor]]:
        n = len(rows)
        result: list[dict[str, OutputTensor]] = [{} for _ in range(n)]
        for name, datatype, dtype, scatter_like in self._outputs:
            value = outputs.get(name)
            if value is None:
                continue
            if scatter_like and n > 1:
                parts = unpadded(value, [r.inputs[scatter_like].shape for r in requests], rows)
                for per, part in zip(result, parts, strict=True):
                    part = np.ascontiguousarray(part, dtype=dtype)
                    per[name] = OutputTensor(name, datatype, raw=part.tobytes(),
                                             shape=tuple(part.shape))
                continue
            if datatype is DataType.BYTES:
                for per, part in zip(result, _split_objects(value, rows), strict=True):
                    per[name] = OutputTensor(name, datatype, part)
                continue
            # The encoder's dtype (a no-op for what onnxruntime returns), once per batch.
            value = np.asarray(value, dtype=dtype, order="C")
            if n == 1:
                result[0][name] = OutputTensor(name, datatype, raw=value.tobytes(),
                                               shape=tuple(value.shape))
                continue
            row_shape = tuple(value.shape[1:])
            for per, raw, count in zip(result, _native.scatter(value, rows), rows, strict=True):
                per[name] = OutputTensor(name, datatype, raw=raw, shape=(count, *row_shape))
        return result


def padded_inner(arrays: Sequence[Array]) -> tuple[int, ...] | None:
    """The largest extent in each dim after the first, or None when all extents agree (then
    the arrays concatenate as they are)."""
    first = arrays[0].shape[1:]
    if all(a.shape[1:] == first for a in arrays):
        return None
    return tuple(max(a.shape[k] for a in arrays) for k in range(1, arrays[0].ndim))


def unpadded(value: Array, shapes: Sequence[tuple[int, ...]],
             rows: Sequence[int]) -> Iterator[Array]:
    """Each request's rows of a batch output, cut back to the request's own extents of the
    ragged input it is scattered like (its leading dims); trailing dims stay whole."""
    start = 0
    for shape, count in zip(shapes, rows, strict=True):
        yield value[(slice(start, start + count), *(slice(0, d) for d in shape[1:]))]
        start += count


def _split_objects(value: Array, rows: Sequence[int]) -> Iterator[Array]:
    if len(rows) == 1:
        yield value
        return
    start = 0
    for count in rows:
        yield value[start:start + count]
        start += count


class NativePacker:
    """The Packer of the compiled path (the default; PEREGRINE_NATIVE=0 picks the reference).

    ``allocator`` provides every version's batch buffers: the hook for pinned host memory when
    a backend runs on a GPU.
    """

    native = True

    def __init__(self, allocator: Allocator = host_allocator) -> None:
        self._allocator = allocator

    def for_model(self, spec: ModelSpec, version: str,
                  allocator: Allocator | None = None) -> ModelPacker:
        return NativeModelPacker(spec, allocator or self._allocator)

