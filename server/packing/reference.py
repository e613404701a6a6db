"""The plain numpy packer: the oracle for the compiled one (server/packing/native.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import nullcontext

import numpy as np

from server.interfaces import ModelPacker
from server.packing.pool import Allocator
from server.preprocess.reference import preprocess_batch, preprocess_image, to_bfloat16_bits
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType, InferRequest, OutputTensor


def ragged_pad_element(tensor: TensorSpec) -> Array:
    """A ragged input's pad value as one 0-d element of its numpy dtype (BF16 as its word)."""
    if tensor.datatype is DataType.BF16:
        return to_bfloat16_bits(np.array(tensor.pad_value, dtype=np.float32)).reshape(())
    return np.array(tensor.pad_value).astype(tensor.datatype.numpy_dtype)


def concat_padded(arrays: Sequence[Array], pad: object, shape: tuple[int, ...] | None = None,
                  dtype: np.dtype[np.generic] | None = None) -> Array:
    """Ragged batching oracle: ``arrays`` stacked along axis 0, each anchored at index 0 of
    every other axis and padded with ``pad`` up to the largest extent (or ``shape[1:]``)."""
    if not arrays and (shape is None or dtype is None):
        raise ValueError("no arrays: give shape and dtype")
    dtype = dtype if dtype is not None else arrays[0].dtype
    if shape is None:
        inner = tuple(max(a.shape[k] for a in arrays) for k in range(1, arrays[0].ndim))
        shape = (sum(a.shape[0] for a in arrays), *inner)
    out = np.full(shape, pad, dtype=dtype)
    row = 0
    for a in arrays:
        index = (slice(row, row + a.shape[0]), *(slice(0, d) for d in a.shape[1:]))
        out[index] = a
        row += a.shape[0]
    return out


class ReferenceModelPacker:
    """np.concatenate / np.split, and the numpy preprocessing oracle."""

    def __init__(self, spec: ModelSpec) -> None:
        self._names = [t.name for t in spec.inputs]
        self._pads = {t.name: ragged_pad_element(t) for t in spec.inputs if t.ragged}
        self._scatter = {t.name: t.scatter_like for t in spec.outputs if t.scatter_like}
        self._batches = spec.batches
        self._outputs = {t.name: t.datatype for t in spec.outputs}
        pre = spec.preprocess
        self._pre = pre
        self._pre_input = spec.input(pre.input) if pre is not None else None

    def pack(
        self, requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> nullcontext[dict[str, Array]]:
        if len(requests) == 1:
            return self.pack_rows(requests[0].inputs)
        first = requests[0].inputs
        batch: dict[str, Array] = {}
        for name in self._names:
            if name not in first:
                continue
            arrays = [r.inputs[name] for r in requests]
            if self._pre is not None and self._pre_input is not None and name == self._pre.input:
                batch[name] = preprocess_batch(arrays, self._pre, self._pre_input)
            elif name in self._pads:
                batch[name] = concat_padded(arrays, self._pads[name])
            else:
                batch[name] = np.concatenate(arrays, axis=0)
        return nullcontext(batch)

    def pack_rows(self, inputs: Mapping[str, Array]) -> nullcontext[dict[str, Array]]:
        batch: dict[str, Array] = {}
        for name in self._names:
            if name not in inputs:
                continue
            if self._pre is not None and self._pre_input is not None and name == self._pre.input:
                batch[name] = (preprocess_batch([inputs[name]], self._pre, self._pre_input)
                               if self._batches else
                               preprocess_image(inputs[name], self._pre, self._pre_input))
            else:
                batch[name] = inputs[name]
        return nullcontext(batch)

    def unpack(
        self, outputs: Mapping[str, Array], requests: Sequence[InferRequest], rows: Sequence[int]
    ) -> list[dict[str, OutputTensor]]:
        declared = [(n, v, self._outputs[n]) for n, v in outputs.items() if n in self._outputs]
        if len(rows) == 1:
            return [{n: OutputTensor(n, dt, v) for n, v, dt in declared}]
        split_at = np.cumsum(rows)[:-1]
        parts = [(n, dt, np.split(v, split_at, axis=0)) for n, v, dt in declared]
        result = [{n: OutputTensor(n, dt, p[i]) for n, dt, p in parts}
                  for i in range(len(rows))]
        for name, source in self._scatter.items():
            if name not in outputs:
                continue
            for per, request in zip(result, requests, strict=True):
                extents = request.inputs[source].shape[1:]
                part = per[name].data[(slice(None), *(slice(0, d) for d in extents))]
                per[name] = OutputTensor(name, self._outputs[name], np.ascontiguousarray(part))
        return result


class ReferencePacker:
    """The Packer whose model packers are the numpy oracle (PEREGRINE_NATIVE=0)."""

    native = False

    def for_model(self, spec: ModelSpec, version: str,
                  allocator: Allocator | None = None) -> ModelPacker:
        """The oracle builds each batch with numpy and pools nothing: ``allocator`` is not
        used (a GPU backend stages what it gets)."""
        return ReferenceModelPacker(spec)


__all__ = ["ReferenceModelPacker", "ReferencePacker", "concat_padded", "ragged_pad_element"]
