"""Reference data for ``peregrine drift profile``: .npz, .npy, .csv or .parquet, as tensors.

* ``.npz``: one array per tensor, named as the tensor (a lone array feeds a lone input);
* ``.npy``: the model's only input;
* ``.csv`` / ``.parquet``: columns named ``<tensor>`` or ``<tensor>[i]`` form that tensor
  (columns ``input[0]``..``input[63]``, say, or a ``label`` column for an output); the other
  columns, in order, form the model's only input not named otherwise. A CSV's first row is a
  header when any of its cells is not a number.

Outputs in the file are used as they are; missing ones are computed by running the model.
Arrays come back batch-first, cast to the tensor's datatype and shaped to its dims.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from server.parquet import read_columns
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType

_INDEXED = re.compile(r"^(.*)\[(\d+)\]$")


def load(path: Path, spec: ModelSpec) -> dict[str, Array]:
    suffix = path.suffix.lower()
    if suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            raw = {name: data[name] for name in data.files}
        if len(raw) == 1 and len(spec.inputs) == 1 and not _tensor(spec, next(iter(raw))):
            raw = {spec.inputs[0].name: next(iter(raw.values()))}
    elif suffix == ".npy":
        raw = {_only_input(spec).name: np.load(path, allow_pickle=False)}
    elif suffix == ".csv":
        raw = _from_columns(_read_csv(path), spec)
    elif suffix == ".parquet":
        raw = _from_columns(read_columns(path, "drift"), spec)
    else:
        raise ValueError(f"{path}: unsupported data file (use .npz, .npy, .csv or .parquet)")
    data = {}
    for name, value in raw.items():
        tensor = _tensor(spec, name)
        if tensor is not None:
            data[name] = conform(value, tensor, spec.batches)
    missing = [t.name for t in spec.inputs if t.name not in data and not t.optional]
    if missing:
        raise ValueError(f"{path}: no data for inputs {missing}; found {sorted(raw)}")
    rows = {name: value.shape[0] for name, value in data.items()}
    if len(set(rows.values())) > 1:
        raise ValueError(f"{path}: tensors have different row counts {rows}")
    return data


def conform(value: Array, tensor: TensorSpec, batched: bool) -> Array:
    """Cast to the tensor's datatype and shape the rows to its dims (each row is one request
    for a model without batching)."""
    value = np.asarray(value)
    if tensor.datatype is DataType.BYTES:
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in value.ravel().tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        value = out.reshape(value.shape)
    else:
        value = value.astype(tensor.datatype.numpy_dtype)
    if value.ndim == 0:
        raise ValueError(f"tensor '{tensor.name}': need one row per sample, got a scalar")
    dims = tensor.dims
    if all(d > 0 for d in dims) and value.shape[1:] != dims:
        if value[0].size != math.prod(dims):
            raise ValueError(
                f"tensor '{tensor.name}': rows of shape {list(value.shape[1:])} do not fit "
                f"dims {list(dims)}"
            )
        value = value.reshape((value.shape[0], *dims))
    return value


def _tensor(spec: ModelSpec, name: str) -> TensorSpec | None:
    return spec.input(name) or spec.output(name)


def _only_input(spec: ModelSpec) -> TensorSpec:
    if len(spec.inputs) != 1:
        raise ValueError(f"model '{spec.name}' has {len(spec.inputs)} inputs; name them "
                         "(an .npz with one array per input, or named columns)")
    return spec.inputs[0]


def _from_columns(columns: Mapping[str, Array], spec: ModelSpec) -> dict[str, Array]:
    named: dict[str, list[tuple[int, Array]]] = {}
    loose: list[Array] = []
    for name, column in columns.items():
        match = _INDEXED.match(name)
        base, index = (match.group(1), int(match.group(2))) if match else (name, 0)
        if _tensor(spec, base) is not None:
            named.setdefault(base, []).append((index, column))
        else:
            loose.append(column)
    tensors = {
        name: np.column_stack([c for _, c in sorted(parts, key=lambda p: p[0])])
        for name, parts in named.items()
    }
    if loose:
        free = [t for t in spec.inputs if t.name not in tensors]
        if len(free) != 1:
            raise ValueError(
                f"columns that name no tensor need exactly one unnamed input; model "
                f"'{spec.name}' leaves {[t.name for t in free]}"
            )
        tensors[free[0].name] = np.column_stack(loose)
    return tensors


def _read_csv(path: Path) -> dict[str, Array]:
    with path.open(newline="", encoding="utf-8") as src:
        rows = [row for row in csv.reader(src) if row]
    if not rows:
        raise ValueError(f"{path}: empty")
    header: Sequence[str]
    if any(not _is_number(cell) for cell in rows[0]):
        header, rows = rows[0], rows[1:]
    else:
        header = [f"column{i}" for i in range(len(rows[0]))]
    columns: dict[str, Array] = {}
    for index, name in enumerate(header):
        cells = [row[index] for row in rows]
        numeric = all(_is_number(c) for c in cells)
        columns[name] = np.asarray([float(c) for c in cells]) if numeric \
            else np.asarray(cells, dtype=object)
    return columns


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True
