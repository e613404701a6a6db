"""The four ways a version is made from an ONNX source file, each writing one model file.

``onnx`` (and ONNX Runtime's quantisation tools, which import it) are the ``optimize``
extra's; :func:`require_onnx` names it when they are missing.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.optimize import METHODS
from server.types import Array

#: Rows per calibration batch handed to the static quantiser.
CALIBRATION_BATCH = 32
#: Calibration rows used at most (the MinMax ranges settle long before).
CALIBRATION_ROWS = 2048
INSTALL_HINT = "pip install 'peregrine[optimize]'"


def require_onnx() -> None:
    """Raise ImportError with the install line when the ``optimize`` extra is missing."""
    try:
        import onnx  # noqa: F401
    except ImportError:
        raise ImportError(f"the 'onnx' package is needed: {INSTALL_HINT}") from None


def produce(method: str, source: Path, target: Path,
            calibration: Mapping[str, Array] | None = None) -> None:
    """Write ``target`` from ``source`` by ``method`` (one of :data:`METHODS`)."""
    if method not in METHODS:
        raise ValueError(f"unknown method '{method}'; methods: {', '.join(METHODS)}")
    require_onnx()
    # The quantiser logs its advice (pre-processing, per-channel) on the root logger: quiet
    # while it runs, the level restored after.
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        _produce(method, source, target, calibration)
    finally:
        root.setLevel(level)


def _produce(method: str, source: Path, target: Path,
             calibration: Mapping[str, Array] | None) -> None:
    if method == "graph":
        _graph(source, target)
    elif method == "dynamic-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target, weight_type=QuantType.QInt8)
    elif method == "static-int8":
        if not calibration:
            raise ValueError("static-int8 needs calibration data (--calibration FILE, or a "
                             "drift reference profile of the source version)")
        _static(source, target, calibration)
    else:
        _fp16(source, target)


def _graph(source: Path, target: Path) -> None:
    """ONNX Runtime's graph optimisations, applied once and saved. EXTENDED, not ALL: ALL adds
    layout changes specific to this machine's CPU, which a saved model must not carry."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.optimized_model_filepath = str(target)
    ort.InferenceSession(str(source), options, providers=["CPUExecutionProvider"])


def _static(source: Path, target: Path, calibration: Mapping[str, Array]) -> None:
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):  # type: ignore[misc]
        def __init__(self) -> None:
            self._batches = _batches(calibration)

        def get_next(self) -> dict[str, Array] | None:
            return next(self._batches, None)

    quantize_static(source, target, Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def _batches(data: Mapping[str, Array]) -> Iterator[dict[str, Array]]:
    rows = min(CALIBRATION_ROWS, min(len(v) for v in data.values()))
    for start in range(0, rows, CALIBRATION_BATCH):
        yield {name: np.ascontiguousarray(value[start:start + CALIBRATION_BATCH])
               for name, value in data.items()}


def _fp16(source: Path, target: Path) -> None:
    """Weights and arithmetic in FP16, inputs and outputs kept FP32 (clients send what they
    sent before). Meant for GPU targets: a CPU runs FP16 slower than FP32."""
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model: Any = onnx.load(str(source))
    onnx.save(convert_float_to_float16(model, keep_io_types=True), str(target))
