"""TensorRT itself: imported only when a TensorRT model loads (a clear ModelLoadError
without it), and its tensor types in ours."""

from __future__ import annotations

from typing import Any

from server.errors import ModelLoadError
from server.types import DataType

#: TensorRT DataType names -> ours. BF16 travels as raw uint16 words, as everywhere here.
TRT_TYPES: dict[str, DataType] = {
    "FLOAT": DataType.FP32,
    "HALF": DataType.FP16,
    "BF16": DataType.BF16,
    "INT8": DataType.INT8,
    "INT32": DataType.INT32,
    "INT64": DataType.INT64,
    "BOOL": DataType.BOOL,
    "UINT8": DataType.UINT8,
}


def import_tensorrt() -> Any:
    """The tensorrt module; ModelLoadError when it is not installed."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ModelLoadError(
            "tensorrt is not installed (it comes with the 'gpu' extra: pip install "
            f"'peregrine[gpu]' on a CUDA machine): {exc}"
        ) from None
    return tensorrt


def datatype_of(trt_dtype: Any) -> DataType:
    name = str(getattr(trt_dtype, "name", trt_dtype)).rsplit(".", 1)[-1]
    try:
        return TRT_TYPES[name]
    except KeyError:
        raise ModelLoadError(
            f"TensorRT tensor type {name} is not supported; supported: {sorted(TRT_TYPES)}"
        ) from None
