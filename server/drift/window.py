"""Rows of sampled features, and the sliding and fixed (tumbling) windows over them.

A row is one batch row of a sampled request; every monitored tensor has a row for it, so the
columns of a block stay aligned (the sample store writes them as one table). A response that
did not carry a monitored output (the client asked for others) leaves its rows of that tensor
marked absent in ``present`` rather than made up.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from server.drift.features import Role, TensorLayout, stack
from server.drift.sampler import CapturedSample
from server.types import Array


@dataclass(slots=True)
class Block:
    rows: int
    request_ids: Array
    #: Tensor -> rows x features (float64, or str objects for categorical tensors).
    values: dict[str, Array]
    #: Tensor -> bool per row, only for tensors with absent rows.
    present: dict[str, Array] = field(default_factory=dict)

    @staticmethod
    def empty() -> Block:
        return Block(0, np.empty(0, dtype=object), {})

    def take(self, rows: slice) -> Block:
        ids = self.request_ids[rows]
        return Block(
            rows=int(ids.shape[0]),
            request_ids=ids,
            values={name: v[rows] for name, v in self.values.items()},
            present={name: p[rows] for name, p in self.present.items()},
        )


def concat(blocks: Sequence[Block]) -> Block:
    blocks = [b for b in blocks if b.rows]
    if not blocks:
        return Block.empty()
    if len(blocks) == 1:
        return blocks[0]
    names = blocks[0].values.keys()
    present: dict[str, Array] = {}
    for name in {n for b in blocks for n in b.present}:
        present[name] = np.concatenate([
            b.present.get(name, np.ones(b.rows, dtype=bool)) for b in blocks
        ])
    return Block(
        rows=sum(b.rows for b in blocks),
        request_ids=np.concatenate([b.request_ids for b in blocks]),
        values={name: np.concatenate([b.values[name] for b in blocks]) for name in names},
        present=present,
    )


@dataclass(slots=True)
class Assembly:
    block: Block
    #: Samples whose tensor did not have the profile's number of features.
    mismatched: int


def assemble(
    samples: Sequence[CapturedSample],
    layouts: Sequence[TensorLayout],
    widths: Mapping[str, int],
) -> Assembly:
    """Samples -> one block. ``widths`` is the profile's feature count per tensor."""
    if not samples or not layouts:
        return Assembly(Block.empty(), 0)
    sources = {
        layout.name: [(s.inputs if layout.role is Role.INPUT else s.outputs).get(layout.name)
                      for s in samples]
        for layout in layouts
    }
    first = next((t for t in layouts if t.role is Role.INPUT), layouts[0])
    counts = [1 if v is None or not first.batched or not v.ndim else int(v.shape[0])
              for v in sources[first.name]]
    total = sum(counts)
    ids = np.repeat(np.asarray([s.request_id for s in samples], dtype=object), counts)
    values: dict[str, Array] = {}
    present: dict[str, Array] = {}
    mismatched = 0
    for layout in layouts:
        width = widths[layout.name]
        source = sources[layout.name]
        if all(v is not None for v in source):
            matrix = stack(layout, [v for v in source if v is not None])
            if matrix is not None and matrix.shape == (total, width):
                values[layout.name] = matrix
                continue
        # The slow path: an absent tensor, or shapes that differ between requests.
        parts: list[Array] = []
        flags: list[Array] = []
        for value, rows in zip(source, counts, strict=True):
            part = layout.matrix(layout.as_rows(value)) if value is not None else None
            if part is not None and part.shape != (rows, width):
                mismatched += 1
                part = None
            parts.append(part if part is not None else layout.missing_rows(rows, width))
            flags.append(np.full(rows, part is not None))
        values[layout.name] = np.concatenate(parts)
        present[layout.name] = np.concatenate(flags)
    return Assembly(Block(total, ids, values, present), mismatched)


class Windows:
    """The sliding window (the last ``size`` rows) and the fixed windows (every ``size`` rows)
    of one model version. Fed and read by the analyser thread only."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._sliding = Block.empty()
        self._pending: list[Block] = []
        self._pending_rows = 0
        self.total_rows = 0

    @property
    def sliding(self) -> Block:
        return self._sliding

    def add(self, block: Block) -> list[Block]:
        """Append rows; returns the fixed windows that this completes, oldest first."""
        if not block.rows:
            return []
        self.total_rows += block.rows
        joined = concat([self._sliding, block])
        self._sliding = joined.take(slice(max(0, joined.rows - self.size), None))
        self._pending.append(block)
        self._pending_rows += block.rows
        done: list[Block] = []
        if self._pending_rows >= self.size:
            rest = concat(self._pending)
            start = 0
            while rest.rows - start >= self.size:
                done.append(rest.take(slice(start, start + self.size)))
                start += self.size
            tail = rest.take(slice(start, None))
            self._pending = [tail] if tail.rows else []
            self._pending_rows = tail.rows
        return done

    def flush(self) -> Block:
        """Take the partial fixed window (at shutdown)."""
        rest = concat(self._pending)
        self._pending = []
        self._pending_rows = 0
        return rest
