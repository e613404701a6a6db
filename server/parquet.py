"""A parquet file's columns as numpy arrays: ``peregrine batch``'s input files and drift's
reference data read parquet through this one reader.

A column of numbers becomes a numeric array, any other scalar column an object array, and a
list column (a vector per row) a 2-D array. A missing value, or rows of a list column of
different lengths, is refused naming the column and the row."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from server.types import Array


class ParquetError(ValueError):
    """The file is not readable parquet, or a column has a missing value or ragged rows."""


def read_columns(path: Path, extra: str) -> dict[str, Array]:
    """Every column of ``path``, in file order. ``extra``: the package extra that installs
    pyarrow, named when it is missing."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise ParquetError(f"reading .parquet needs pyarrow (pip install 'peregrine[{extra}]')") \
            from None
    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as exc:
        raise ParquetError(f"{path}: not a readable parquet file ({exc})") from None
    columns: dict[str, Array] = {}
    for name in table.column_names:
        column = table.column(name)
        if column.null_count:
            row = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
            raise ParquetError(f"{path}: column '{name}', row {row}: missing value")
        if pa.types.is_list(column.type) or pa.types.is_fixed_size_list(column.type) \
                or pa.types.is_large_list(column.type):
            columns[name] = _vectors(path, name, column.to_pylist())
        else:
            array = column.to_numpy()
            columns[name] = array if array.dtype.kind in "biuf" else array.astype(object)
    return columns


def _vectors(path: Path, name: str, values: list[Any]) -> Array:
    width = len(values[0]) if values else 0
    for row, value in enumerate(values):
        if any(v is None for v in value):
            raise ParquetError(f"{path}: column '{name}', row {row}: missing value")
        if len(value) != width:
            raise ParquetError(f"{path}: column '{name}', row {row}: {len(value)} values; "
                               f"row 0 has {width}")
    return np.asarray(values)
