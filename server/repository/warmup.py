"""Synthetic warm-up inputs from a config's model_warmup entries."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from server.errors import ModelLoadError
from server.security.paths import confined
from server.spec import ModelSpec, WarmupInput, WarmupSpec
from server.types import Array, DataType

WARMUP_DIR = "warmup"


def _array(spec: WarmupInput, shape: tuple[int, ...], model_dir: Path, seed: int) -> Array:
    count = int(np.prod(shape)) if shape else 1
    if spec.source == "file":
        path = confined(model_dir / WARMUP_DIR, spec.data_file, "model_warmup input_data_file")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ModelLoadError(f"warm-up data file {path}: {exc}") from exc
        if spec.datatype is DataType.BYTES:
            return np.array([raw] * count, dtype=object).reshape(shape)
        needed = count * spec.datatype.itemsize
        if len(raw) < needed:
            raise ModelLoadError(f"warm-up data file {path} has {len(raw)} bytes; needs {needed}")
        return np.frombuffer(raw[:needed], dtype=spec.datatype.numpy_dtype).reshape(shape)
    if spec.datatype is DataType.BYTES:
        text = b"" if spec.source == "zero" else b"warmup"
        return np.array([text] * count, dtype=object).reshape(shape)
    if spec.source == "zero":
        return np.zeros(shape, dtype=spec.datatype.numpy_dtype)
    rng = np.random.default_rng(seed)
    if spec.datatype is DataType.BOOL:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if spec.datatype.numpy_dtype.kind == "f":
        return rng.random(shape).astype(spec.datatype.numpy_dtype)
    return rng.integers(0, 100, size=shape).astype(spec.datatype.numpy_dtype)


def warmup_inputs(spec: ModelSpec, warm: WarmupSpec, model_dir: Path) -> dict[str, Array]:
    inputs: dict[str, Array] = {}
    for index, (name, data) in enumerate(sorted(warm.inputs.items())):
        declared = spec.input(name)
        if declared is None:
            raise ModelLoadError(f"model_warmup '{warm.name}' names unknown input '{name}'")
        if data.datatype is not declared.datatype:
            raise ModelLoadError(
                f"model_warmup '{warm.name}' input '{name}' is {data.datatype.config_name}; "
                f"the model takes {declared.datatype.config_name}"
            )
        shape = (warm.batch_size, *data.dims) if spec.batches else data.dims
        inputs[name] = _array(data, shape, model_dir, seed=index)
    return inputs
