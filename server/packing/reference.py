"""The plain numpy packer: the oracle for any compiled replacement."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from server.types import Array, InferRequest


class ReferencePacker:
    def pack(self, requests: Sequence[InferRequest], names: Sequence[str]) -> dict[str, Array]:
        if len(requests) == 1:
            only = requests[0].inputs
            return {name: only[name] for name in names if name in only}
        return {
            name: np.concatenate([r.inputs[name] for r in requests], axis=0)
            for name in names
            if name in requests[0].inputs
        }

    def unpack(
        self, outputs: Mapping[str, Array], rows: Sequence[int]
    ) -> list[dict[str, Array]]:
        if len(rows) == 1:
            return [dict(outputs)]
        split_at = np.cumsum(rows)[:-1]
        per_output = {name: np.split(value, split_at, axis=0) for name, value in outputs.items()}
        return [
            {name: parts[i] for name, parts in per_output.items()} for i in range(len(rows))
        ]
