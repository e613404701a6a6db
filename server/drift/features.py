"""Which numbers of a tensor are "features", and how a tensor becomes a rows x features matrix.

One code path for the reference data (``peregrine drift profile``) and for live samples, so
the two are always comparable. A row is one batch row of a request. The feature axis is
counted with the batch axis (a model without batching gets a batch axis of 1 added first).
The other non-batch axes are averaged per feature: an image [N, 3, H, W] with axis 1 gives
three per-channel means per row. Categorical tensors are not averaged: all their non-batch
values are features.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from server.drift.options import DriftConfig
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType


class Kind(enum.Enum):
    NUMERIC = "numeric"
    CATEGORICAL = "categorical"


class Role(enum.Enum):
    INPUT = "input"
    OUTPUT = "output"


_ALWAYS_CATEGORICAL = frozenset({DataType.BYTES, DataType.BOOL})
_INTEGER = frozenset({
    DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64,
    DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64,
})


@dataclass(frozen=True, slots=True)
class TensorLayout:
    name: str
    role: Role
    datatype: DataType
    kind: Kind
    axis: int
    batched: bool

    def as_rows(self, value: Array) -> Array:
        """The tensor of one request with its batch axis (added for a model without batching)."""
        return value if self.batched else value[np.newaxis]

    def matrix(self, rows: Array) -> Array:
        """Rows x features of a batch-first array: float64 for numeric tensors, str objects
        for categorical ones."""
        if self.kind is Kind.CATEGORICAL:
            return _as_text(rows.reshape(rows.shape[0], -1))
        rows = _as_float(rows, self.datatype)
        if rows.ndim == 1:
            return rows[:, np.newaxis]
        axis = self.axis if self.axis > 0 else rows.ndim + self.axis
        if not 1 <= axis < rows.ndim:
            raise ValueError(
                f"feature axis {self.axis} does not fit tensor '{self.name}' of shape "
                f"{list(rows.shape)} (batch axis included)"
            )
        moved = np.moveaxis(rows, axis, 1)
        if moved.ndim == 2:
            return moved
        means: Array = moved.reshape(moved.shape[0], moved.shape[1], -1).mean(axis=2)
        return means

    def feature_names(self, count: int) -> list[str]:
        if count == 1:
            return [self.name]
        return [f"{self.name}[{i}]" for i in range(count)]

    def missing_rows(self, rows: int, features: int) -> Array:
        """The filler for rows whose response did not carry this tensor."""
        if self.kind is Kind.CATEGORICAL:
            return np.full((rows, features), None, dtype=object)
        return np.full((rows, features), np.nan)


def layouts(spec: ModelSpec, config: DriftConfig) -> list[TensorLayout]:
    """The monitored tensors of a model, inputs first, in the order of its config."""
    wanted = set(config.tensors)
    known = {t.name for t in spec.inputs} | {t.name for t in spec.outputs}
    unknown = wanted - known
    if unknown:
        raise ValueError(f"drift_tensors names {sorted(unknown)}, which model "
                         f"'{spec.name}' does not have")
    chosen: list[TensorLayout] = []
    for role, tensors in ((Role.INPUT, spec.inputs), (Role.OUTPUT, spec.outputs)):
        for tensor in tensors:
            if wanted and tensor.name not in wanted:
                continue
            chosen.append(TensorLayout(
                name=tensor.name,
                role=role,
                datatype=tensor.datatype,
                kind=_kind(tensor, role, config),
                axis=config.axis_of(tensor.name),
                batched=spec.batches,
            ))
    return chosen


def _kind(tensor: TensorSpec, role: Role, config: DriftConfig) -> Kind:
    if tensor.datatype in _ALWAYS_CATEGORICAL or tensor.name in config.categorical:
        return Kind.CATEGORICAL
    if role is Role.OUTPUT and tensor.datatype in _INTEGER:
        return Kind.CATEGORICAL  # integer outputs are class labels: compare class frequencies
    return Kind.NUMERIC


def _as_float(value: Array, datatype: DataType) -> Array:
    if datatype is DataType.BF16:
        # bfloat16 words are the top half of a float32.
        return (value.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    return value.astype(np.float64, copy=False)


def _as_text(value: Array) -> Array:
    if value.dtype != object:
        return value.astype(str).astype(object)
    flat = [_text(item) for item in value.ravel()]
    out = np.empty(len(flat), dtype=object)
    out[:] = flat
    return out.reshape(value.shape)


def _text(item: object) -> str | None:
    if item is None:
        return None
    if isinstance(item, bytes):
        return item.decode("utf-8", errors="replace")
    return str(item)


def stack(layout: TensorLayout, values: Sequence[Array]) -> Array | None:
    """One matrix for the arrays of many requests, concatenated first so that the conversion
    runs once; None when their per-row shapes differ (the caller then goes one by one)."""
    batches = [layout.as_rows(v) for v in values]
    if not batches:
        raise ValueError("nothing to stack")
    shape = batches[0].shape[1:]
    if any(b.shape[1:] != shape for b in batches):
        return None
    return layout.matrix(np.concatenate(batches))
