"""Which config tensor is which argument of ``forward`` and which part of its result, as
Triton's PyTorch backend names them: ``<name>__<index>`` (``INPUT__0``, ``OUTPUT__1``) by
position, any other input by its forward argument's name, any other output by its key when
forward returns a dict, else by its place among the config's outputs."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.backends.pytorch.program import ArgSpec
from server.errors import BackendError, ModelLoadError
from server.spec import ModelSpec, TensorSpec

_INDEXED = re.compile(r".+__(\d+)")


def _index(name: str) -> int | None:
    match = _INDEXED.fullmatch(name)
    return int(match.group(1)) if match else None


@dataclass(frozen=True, slots=True)
class Binding:
    #: Config input names in forward's argument order.
    inputs: tuple[str, ...]
    #: Per config output: its position in a tuple or list result (a dict's by name).
    outputs: tuple[tuple[str, int], ...]

    def arguments(self, tensors: Mapping[str, Any]) -> list[Any]:
        return [tensors[name] for name in self.inputs]

    def results(self, result: Any) -> dict[str, Any]:
        """The config's outputs out of what forward returned: a tensor, a tuple or list of
        them, or a dict by name. BackendError when the result does not have them."""
        if isinstance(result, Mapping):
            missing = [name for name, _ in self.outputs if name not in result]
            if missing:
                raise BackendError(f"the PyTorch model returned outputs {sorted(result)}, "
                                   f"without {missing}")
            return {name: result[name] for name, _ in self.outputs}
        parts: Sequence[Any] = result if isinstance(result, (tuple, list)) else (result,)
        found: dict[str, Any] = {}
        for name, index in self.outputs:
            if index >= len(parts):
                raise BackendError(
                    f"the PyTorch model returned {len(parts)} tensor(s); config output "
                    f"'{name}' is result {index} (name outputs <name>__<index>, or return a "
                    "dict by name)"
                )
            found[name] = parts[index]
        return found


def bind(spec: ModelSpec, args: Sequence[ArgSpec]) -> Binding:
    """Match the config's inputs to forward's arguments and its outputs to result positions.
    Raises ModelLoadError naming the tensor that matches nothing."""
    names = [a.name for a in args]
    order: dict[int, str] = {}
    for tensor in spec.inputs:
        where = f"model '{spec.name}' input '{tensor.name}'"
        if tensor.optional:
            raise ModelLoadError(f"{where}: optional inputs are not supported by the PyTorch "
                                 "backend (forward takes every argument)")
        index = _index(tensor.name)
        if index is None:
            if tensor.name not in names:
                raise ModelLoadError(
                    f"{where} is neither named <name>__<index> (INPUT__0) nor an argument of "
                    f"the model's forward, which takes {names}"
                )
            index = names.index(tensor.name)
        if index in order:
            raise ModelLoadError(f"{where} and input '{order[index]}' are both forward "
                                 f"argument {index}")
        order[index] = tensor.name
    required = sum(1 for a in args if not a.has_default)
    if sorted(order) != list(range(len(order))) or not required <= len(order) <= len(args):
        raise ModelLoadError(
            f"model '{spec.name}': the config's inputs are forward arguments {sorted(order)}, "
            f"but forward takes {names} ({required} without a default): give each argument "
            "from the first, without gaps"
        )
    return Binding(tuple(order[i] for i in range(len(order))), _outputs(spec.outputs))


def _outputs(outputs: Sequence[TensorSpec]) -> tuple[tuple[str, int], ...]:
    """Each output's position in a sequence result: its index when it is named
    ``<name>__<index>``, else its place among the config's outputs."""
    return tuple((t.name, place if index is None else index)
                 for place, t in enumerate(outputs) for index in (_index(t.name),))
