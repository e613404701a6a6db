"""ONNX Runtime IO bound to buffers that never move, for a session that replays one captured
CUDA graph (ONNX Runtime's TensorRT provider with ``trt_cuda_graphs``): the graph reads and
writes the addresses it was captured with, so every run's inputs are copied into the same
device buffers (``OrtValue.update_inplace``) and its outputs land in the same ones. Only for
models whose every run has one shape (server/accelerator_options.py require_fixed_shapes)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from server.errors import InvalidInput
from server.spec import ModelSpec, TensorSpec
from server.types import Array


def _value(tensor: TensorSpec, device: str, device_id: int) -> Any:
    return ort.OrtValue.ortvalue_from_shape_and_type(
        list(tensor.dims), tensor.datatype.numpy_dtype, device, device_id)


class FixedBinding:
    """One IO binding over buffers allocated once on ``device`` ("cuda", or "cpu")."""

    def __init__(self, session: ort.InferenceSession, spec: ModelSpec, device: str,
                 device_id: int) -> None:
        self._session = session
        self._inputs = {t.name: _value(t, device, device_id) for t in spec.inputs}
        self._shapes = {t.name: tuple(t.dims) for t in spec.inputs}
        self._outputs = [(t.name, _value(t, device, device_id)) for t in spec.outputs]
        self._binding = session.io_binding()
        for name, value in self._inputs.items():
            self._binding.bind_ortvalue_input(name, value)
        for name, value in self._outputs:
            self._binding.bind_ortvalue_output(name, value)

    def run(self, inputs: Mapping[str, Array], run_options: ort.RunOptions) -> dict[str, Array]:
        for name, buffer in self._inputs.items():
            value = np.ascontiguousarray(inputs[name])
            if value.shape != self._shapes[name]:  # validation lets only these shapes in
                raise InvalidInput(f"input '{name}' has shape {list(value.shape)}; this model "
                                   f"replays a CUDA graph of {list(self._shapes[name])}")
            buffer.update_inplace(value)
        self._session.run_with_iobinding(self._binding, run_options)
        return {name: np.array(value.numpy()) for name, value in self._outputs}
