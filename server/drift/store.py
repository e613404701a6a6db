"""The sample store: each fixed window of sampled rows as one columnar file, size-capped.

Parquet when pyarrow is installed (``pip install 'peregrine[drift]'``), else numpy .npz. One
column per feature (named as on /metrics, e.g. ``input[3]``), ``request_id``, and
``present:<tensor>`` for a tensor some responses did not carry; the window's results travel
in the file's metadata. Files are written under a temporary name and renamed, so readers never
see half a file; after each write the oldest files go until the directory fits the cap. They
are meant to be read back: by ``peregrine drift report``, or to feed retraining.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.atomic_file import replace_atomically
from server.drift.features import Kind
from server.drift.profile import ReferenceProfile
from server.drift.window import Block
from server.types import Array

log = logging.getLogger(__name__)

META_KEY = "peregrine.drift"
_NAME = re.compile(r"^window-(\d+)\.(parquet|npz)$")


def parquet_available() -> bool:
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        return False
    return True


@dataclass(frozen=True, slots=True)
class StoredWindow:
    path: Path
    sequence: int
    meta: Mapping[str, Any]
    columns: Mapping[str, Array]


class SampleStore:
    """Writes the windows of one model version; used from the analyser thread only."""

    def __init__(self, directory: Path, max_bytes: int, fmt: str = "auto") -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        if fmt == "auto":
            fmt = "parquet" if parquet_available() else "npz"
        elif fmt == "parquet" and not parquet_available():
            raise ValueError("drift_store_format parquet needs pyarrow "
                             "(pip install 'peregrine[drift]')")
        self.format = fmt
        if fmt == "parquet" and self.enabled:
            _warm_parquet()
        existing = [s for s, _ in _listing(directory)]
        self._next = max(existing) + 1 if existing else 0

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0

    def write(
        self, block: Block, profile: ReferenceProfile, meta: Mapping[str, Any]
    ) -> Path | None:
        if not self.enabled or not block.rows:
            return None
        self.directory.mkdir(parents=True, exist_ok=True)
        sequence = self._next
        self._next += 1
        document = {**meta, "sequence": sequence, "rows": block.rows}
        columns = to_columns(block, profile)
        path = self.directory / f"window-{sequence:08d}.{self.format}"
        write = _write_parquet if self.format == "parquet" else _write_npz
        replace_atomically(path, lambda tmp: write(tmp, columns, document), durable=False)
        self._rotate()
        return path if path.exists() else None

    def _rotate(self) -> None:
        listing = _listing(self.directory)
        sizes = [(path, path.stat().st_size) for _, path in listing]
        total = sum(size for _, size in sizes)
        for path, size in sizes:  # oldest first
            if total <= self.max_bytes:
                break
            path.unlink(missing_ok=True)
            total -= size


def _listing(directory: Path) -> list[tuple[int, Path]]:
    if not directory.is_dir():
        return []
    found = []
    for path in directory.iterdir():
        match = _NAME.match(path.name)
        if match:
            found.append((int(match.group(1)), path))
    return sorted(found)


def window_files(directory: Path) -> list[Path]:
    """The window files of one version's store, oldest first (what a retrain script reads)."""
    return [path for _, path in _listing(directory)]


def to_columns(block: Block, profile: ReferenceProfile) -> dict[str, Array]:
    columns: dict[str, Array] = {"request_id": block.request_ids.astype(str)}
    for tensor in profile.tensors:
        values = block.values.get(tensor.name)
        if values is None:
            continue
        for index, name in enumerate(tensor.feature_names):
            columns[name] = values[:, index]
        if tensor.name in block.present:
            columns[f"present:{tensor.name}"] = block.present[tensor.name]
    return columns


def to_block(columns: Mapping[str, Array], profile: ReferenceProfile) -> Block:
    """The inverse of :func:`to_columns` (tensors missing from the file are left out)."""
    ids = np.asarray(columns.get("request_id", np.empty(0)), dtype=object)
    values: dict[str, Array] = {}
    present: dict[str, Array] = {}
    for tensor in profile.tensors:
        names = tensor.feature_names
        if not names or any(n not in columns for n in names):
            continue
        flags = columns.get(f"present:{tensor.name}")
        if tensor.kind is Kind.NUMERIC:
            matrix = np.column_stack([np.asarray(columns[n], dtype=np.float64) for n in names])
        else:
            matrix = np.empty((ids.shape[0], len(names)), dtype=object)
            for index, name in enumerate(names):
                matrix[:, index] = list(columns[name])
            if flags is not None:
                matrix[~np.asarray(flags, dtype=bool)] = None
        values[tensor.name] = matrix
        if flags is not None:
            present[tensor.name] = np.asarray(flags, dtype=bool)
    return Block(int(ids.shape[0]), ids, values, present)


def _write_parquet(path: Path, columns: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrays = {}
    for name, column in columns.items():
        if column.dtype == object:
            arrays[name] = pa.array(column.tolist(), type=pa.string())
        else:
            arrays[name] = pa.array(column)
    table = pa.table(arrays)
    table = table.replace_schema_metadata({META_KEY: json.dumps(meta)})
    pq.write_table(table, path)


def _warm_parquet() -> None:
    """pyarrow's first Parquet write sets up its codecs and pools (about 0.2 s): pay that when
    the store opens, before traffic, not on the first window."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"x": pa.array([0.0])}), io.BytesIO())


def _write_npz(path: Path, columns: Mapping[str, Array], meta: Mapping[str, Any]) -> None:
    arrays = {}
    for name, column in columns.items():
        if column.dtype == object:
            column = np.asarray(["" if v is None else v for v in column.tolist()], dtype=str)
        arrays[name] = column
    arrays["__meta__"] = np.asarray(json.dumps(meta))
    with path.open("wb") as out:
        np.savez(out, **arrays)  # type: ignore[arg-type]


def read_windows(directory: Path) -> list[StoredWindow]:
    """Every stored window of one version, oldest first; unreadable files are skipped."""
    windows = []
    for sequence, path in _listing(directory):
        try:
            meta, columns = _read(path)
        except Exception as exc:  # a file rotated away or half-copied by hand
            log.warning("skipping unreadable drift window", extra={"path": str(path),
                                                                    "error": repr(exc)})
            continue
        windows.append(StoredWindow(path, sequence, meta, columns))
    return windows


def _read(path: Path) -> tuple[dict[str, Any], dict[str, Array]]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path)
        raw = (table.schema.metadata or {}).get(META_KEY.encode(), b"{}")
        columns = {}
        for name in table.column_names:
            column = table.column(name)
            if column.type == "string":
                columns[name] = np.asarray(column.to_pylist(), dtype=object)
            else:
                columns[name] = column.to_numpy()
        return json.loads(raw), columns
    with np.load(path, allow_pickle=False) as data:
        meta = json.loads(str(data["__meta__"]))
        columns = {}
        for name in data.files:
            if name == "__meta__":
                continue
            column = data[name]
            columns[name] = column.astype(object) if column.dtype.kind == "U" else column
        return meta, columns
