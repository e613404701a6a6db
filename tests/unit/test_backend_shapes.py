"""server/backends/shapes.py: a model file's tensor shape against the config's dims, the one
check both backends (ONNX Runtime's model, TensorRT's engine) make."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from server.backends.shapes import check_dims
from server.errors import ModelLoadError
from server.spec import BatchingSpec, ModelSpec, TensorSpec
from server.types import DataType


def spec(max_batch_size: int) -> ModelSpec:
    return ModelSpec(name="m", platform="onnxruntime_onnx", backend="onnxruntime",
                     max_batch_size=max_batch_size,
                     inputs=(TensorSpec("x", DataType.FP32, (3, -1)),),
                     outputs=(TensorSpec("y", DataType.FP32, (2,)),),
                     batching=BatchingSpec(enabled=max_batch_size > 0))


X = TensorSpec("x", DataType.FP32, (3, -1))


@pytest.mark.parametrize("shape", [[-1, 3, 7], ["batch", 3, "n"], [None, 3, -1], (-1, -1, 5)])
def test_matching_shapes_of_a_batching_model(shape: Sequence[object]) -> None:
    check_dims(spec(8), "input", X, shape, "the model")


def test_without_batching_every_dim_is_compared() -> None:
    check_dims(spec(0), "input", X, [3, 9], "the model")
    with pytest.raises(ModelLoadError, match=r"config dims \[3, -1\] do not match the "
                                             r"model's \[-1, 3, 9\]$"):
        check_dims(spec(0), "input", X, [-1, 3, 9], "the model")


def test_a_batching_model_needs_a_dynamic_first_dim() -> None:
    for shape in ([8, 3, 4], []):
        with pytest.raises(ModelLoadError, match=r"model 'm' input 'x' has shape .* in the "
                                                 "TensorRT engine: with max_batch_size > 0"):
            check_dims(spec(8), "input", X, shape, "the TensorRT engine")


@pytest.mark.parametrize("shape", [[-1, 4, 7], [-1, 3], [-1, 3, 7, 1]])
def test_a_mismatch_names_the_model_the_tensor_and_both_dims(shape: list[int]) -> None:
    with pytest.raises(ModelLoadError) as raised:
        check_dims(spec(8), "output", X, shape, "the TensorRT engine")
    assert str(raised.value) == (
        f"model 'm' output 'x': config dims [3, -1] do not match the TensorRT engine's "
        f"{shape[1:]} (batch dimension excluded)")
