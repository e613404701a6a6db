"""The input file of ``peregrine batch`` as row ids and one array per model input.

* ``.npz``: one array per input, named as the input; an array named as the id column gives the
  row ids.
* ``.csv`` (first line a header) / ``.parquet``: a column per input, named as the input (a
  parquet list column for a vector input); or, for a model with a single input, every numeric
  column but the id column, in file order, as that input's values.

The id column (``id`` unless named otherwise) gives the row ids; without one a row's id is its
row number, counted from 0. Every problem is a ``TableError`` naming the column (and the row,
counted from 0) at fault, so the command can print it in one line.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from server.parquet import ParquetError, read_columns
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType


class TableError(ValueError):
    """The input file does not fit the model; the message names the column and row."""


@dataclass(frozen=True, slots=True)
class InputTable:
    #: One id per row, as text.
    ids: list[str]
    #: Model input name -> array of shape (rows, *dims), in the input's datatype.
    inputs: Mapping[str, Array]

    @property
    def rows(self) -> int:
        return len(self.ids)


def read(path: Path, spec: ModelSpec, id_column: str = "id") -> InputTable:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise TableError(f"{path}: no such file")
    if suffix == ".npz":
        columns = _read_npz(path)
    elif suffix == ".csv":
        columns = _read_csv(path)
    elif suffix == ".parquet":
        columns = _read_parquet(path)
    else:
        raise TableError(f"{path}: unsupported input file (use .parquet, .csv or .npz)")
    try:
        return _table(columns, spec, id_column, tensors=suffix == ".npz")
    except TableError as exc:
        raise TableError(f"{path}: {exc}") from None


def _table(columns: dict[str, Array], spec: ModelSpec, id_column: str,
           tensors: bool) -> InputTable:
    id_values = columns.pop(id_column, None)
    lengths = {name: len(value) for name, value in columns.items()}
    if id_values is not None:
        lengths[id_column] = len(id_values)
    if len(set(lengths.values())) > 1:
        raise TableError(f"columns have different row counts {lengths}")
    inputs: dict[str, Array] = {}
    named = {t.name for t in spec.client_inputs}
    for tensor in spec.client_inputs:
        if tensor.name in columns:
            inputs[tensor.name] = _conform(tensor.name, columns[tensor.name], tensor)
    missing = [t for t in spec.client_inputs if t.name not in inputs and not t.optional]
    loose = [name for name in columns if name not in named]
    if missing and len(missing) == 1 and len(spec.client_inputs) == 1 and loose \
            and not tensors:
        tensor = missing[0]
        inputs[tensor.name] = _conform(
            f"columns {loose[0]}..{loose[-1]}" if len(loose) > 1 else f"column {loose[0]}",
            _stack(loose, columns), tensor)
    elif missing:
        kind = "array" if tensors else "column"
        raise TableError(f"missing {kind} for input(s) {[t.name for t in missing]}; the file "
                         f"has {sorted(columns)}")
    rows = next(iter(inputs.values())).shape[0] if inputs else 0
    ids = _ids(id_column, id_values, rows)
    return InputTable(ids, inputs)


def _stack(names: list[str], columns: Mapping[str, Array]) -> Array:
    """The loose columns side by side, each first checked as numbers."""
    parts = []
    for name in names:
        column = columns[name]
        if column.ndim != 1:
            raise TableError(f"column '{name}' holds vectors; name it as the input it feeds")
        parts.append(_numbers(name, column))
    return np.column_stack(parts)


def _ids(id_column: str, values: Array | None, rows: int) -> list[str]:
    if values is None:
        return [str(i) for i in range(rows)]
    if values.dtype.kind == "f" and np.isfinite(values).all() \
            and (values == np.round(values)).all():
        values = values.astype(np.int64)  # a CSV's numbers are read as floats: 7, not 7.0
    ids = [str(v) for v in values.tolist()]
    seen: dict[str, int] = {}
    for row, value in enumerate(ids):
        if value in ("", "None", "nan"):
            raise TableError(f"column '{id_column}', row {row}: empty id")
        first = seen.setdefault(value, row)
        if first != row:
            raise TableError(f"column '{id_column}', row {row}: id '{value}' repeats row "
                             f"{first}")
    return ids


def _numbers(where: str, column: Array) -> Array:
    """A column as float64, or the first cell that is not a number named."""
    if column.dtype.kind in "biuf":
        return column
    try:
        return column.astype(np.float64)
    except (TypeError, ValueError):
        for row, cell in enumerate(column.tolist()):
            try:
                float(cell)
            except (TypeError, ValueError):
                raise TableError(f"column '{where}', row {row}: {cell!r} is not a number") \
                    from None
        raise


def _conform(where: str, value: Array, tensor: TensorSpec) -> Array:
    """Rows cast to the input's datatype and shaped to its dims (one row: one request's
    tensor for a model without batching, one row of a batch for a batching one)."""
    quoted = where if where.startswith("column") else f"'{where}'"
    if tensor.datatype is DataType.BYTES:
        flat = [v if isinstance(v, bytes) else str(v).encode() for v in value.ravel().tolist()]
        out = np.empty(len(flat), dtype=object)
        out[:] = flat
        value = out.reshape(value.shape)
    else:
        if value.dtype.kind not in "biuf":
            if value.ndim != 1:
                raise TableError(f"{quoted}: values of type {value.dtype} are not numbers")
            value = _numbers(where, value)
        target = tensor.datatype.numpy_dtype
        if value.dtype.kind == "f" and target.kind in "iub":
            bad = np.flatnonzero(~np.isfinite(value).all(axis=tuple(range(1, value.ndim)))
                                 | (value != np.round(value)).any(
                                     axis=tuple(range(1, value.ndim))))
            if bad.size:
                raise TableError(f"{quoted}, row {int(bad[0])}: input '{tensor.name}' takes "
                                 f"{tensor.datatype.wire}, not fractions or missing values")
        value = value.astype(target)
    if value.ndim == 0:
        raise TableError(f"{quoted}: one row per sample needed, got a scalar")
    dims = tensor.dims
    if value.ndim == 1 and dims not in ((), (1,)):
        width = math.prod(dims)
        raise TableError(f"input '{tensor.name}' takes {width} values per row "
                         f"(dims {list(dims)}); the file gives 1 ({quoted})")
    if value.ndim == 1:
        value = value.reshape((-1, *dims))
    if all(d > 0 for d in dims) and value.shape[1:] != tuple(dims):
        if math.prod(value.shape[1:]) != math.prod(dims):
            raise TableError(
                f"input '{tensor.name}' takes {math.prod(dims)} values per row (dims "
                f"{list(dims)}); the file gives {math.prod(value.shape[1:])} ({quoted})")
        value = value.reshape((value.shape[0], *dims))
    return np.ascontiguousarray(value)


def _read_npz(path: Path) -> dict[str, Array]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        raise TableError(f"{path}: not a readable .npz file ({exc})") from None


def _read_csv(path: Path) -> dict[str, Array]:
    with path.open(newline="", encoding="utf-8") as src:
        reader = csv.reader(src)
        header = next(reader, None)
        if not header:
            raise TableError(f"{path}: empty (a header line naming the columns comes first)")
        cells: list[list[str]] = [[] for _ in header]
        for row, line in enumerate(reader):
            if not line:
                continue
            if len(line) != len(header):
                raise TableError(f"{path}: row {row} (line {row + 2}) has {len(line)} cells; "
                                 f"the header names {len(header)} columns")
            for column, cell in zip(cells, line, strict=True):
                column.append(cell)
    columns: dict[str, Array] = {}
    for name, values in zip(header, cells, strict=True):
        try:
            columns[name] = np.asarray(values, dtype=np.float64)
        except ValueError:
            columns[name] = np.asarray(values, dtype=object)
    return columns


def _read_parquet(path: Path) -> dict[str, Array]:
    try:
        return read_columns(path, "batch")
    except ParquetError as exc:
        raise TableError(str(exc)) from None
