"""Tensor shapes as the backends check them: a model file's shape against the config's dims."""

from __future__ import annotations

from collections.abc import Sequence

from server.errors import ModelLoadError
from server.spec import ModelSpec, TensorSpec


def check_dims(spec: ModelSpec, kind: str, tensor: TensorSpec, shape: Sequence[object],
               model: str) -> None:
    """The config's dims of ``tensor`` (an ``kind``, input or output) must match ``shape``, its
    shape in the model file (``model`` names that: "the model", "the TensorRT engine").

    A -1, or anything that is not a size (a symbolic dim name, None), matches any size. When
    the model batches, the first dim must be dynamic (the batch) and is left out of the
    comparison, as config dims leave it out. Raises ModelLoadError.
    """
    dims = [d if isinstance(d, int) and d >= 0 else -1 for d in shape]
    expected = list(tensor.dims)
    if spec.batches:
        if not dims or dims[0] != -1:
            raise ModelLoadError(
                f"model '{spec.name}' {kind} '{tensor.name}' has shape {dims} in {model}: "
                "with max_batch_size > 0 its first dimension must be dynamic (the batch)"
            )
        dims = dims[1:]
    if len(dims) != len(expected) or any(
        m != -1 and e != -1 and m != e for m, e in zip(dims, expected, strict=True)
    ):
        raise ModelLoadError(
            f"model '{spec.name}' {kind} '{tensor.name}': config dims {expected} do not match "
            f"{model}'s {dims}" + (" (batch dimension excluded)" if spec.batches else "")
        )
