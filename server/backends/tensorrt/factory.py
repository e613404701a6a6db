"""The TensorRT backend factory: the checks every load starts with (TensorRT, cuda-python,
the device), the engine (the version's plan, or a cached or new build from ONNX),
deserialisation, and the instance."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, TextIO

from server.accelerator_options import TRT_KEYS, TrtOptions, instance_device, parse_trt_options
from server.backends.onnxruntime import OnnxRuntimeFactory
from server.backends.tensorrt import cuda
from server.backends.tensorrt.builder import EngineRecord, engine_from_onnx, model_file
from server.backends.tensorrt.engine_cache import GpuIdentity
from server.backends.tensorrt.library import import_tensorrt
from server.backends.tensorrt.progress import BuildProgress, trt_logger
from server.backends.tensorrt.runtime import (
    TensorRtInstance,
    check_engine_against_spec,
    engine_io,
)
from server.errors import ModelLoadError
from server.spec import ModelSpec, TensorSpec
from server.types import DataType

#: One logger for the whole backend, named as before its split into modules.
log = logging.getLogger(__package__)

class TensorRtFactory:
    """Loads TensorRT instances; builds and caches engines from ONNX when the config asks."""

    parameter_keys = TRT_KEYS

    def __init__(self, progress_stream: TextIO | None = None) -> None:
        #: Where a build draws its progress bar (the CLI passes stderr); logs otherwise.
        self.progress_stream = progress_stream
        self._onnx = OnnxRuntimeFactory()

    def _prepare(self, spec: ModelSpec, device: int) -> tuple[Any, TrtOptions, GpuIdentity]:
        """TensorRT, the model's options and the GPU: the checks every load starts with."""
        options = parse_trt_options(spec.parameters, spec.name)
        trt = import_tensorrt()
        cuda.runtime()
        cuda.require_device(device)
        cuda.set_device(device)
        return trt, options, cuda.identity(device)

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        options = parse_trt_options(spec.parameters, spec.name)
        if options.build_from_onnx:
            # The ONNX file says what the engine will take: read it on the CPU.
            return self._onnx.complete_spec(spec, version_dir)
        trt, _options, _gpu = self._prepare(spec, instance_device(spec, 0))
        path = model_file(spec, Path(version_dir))
        if not path.is_file():
            raise ModelLoadError(f"model file '{path}' is missing")
        _runtime, engine = _deserialize(trt, path.read_bytes(), path)
        if engine is None:
            raise ModelLoadError(_not_deserialized(path))
        inputs, outputs = engine_io(trt, engine)

        def complete(declared: tuple[TensorSpec, ...],
                     actual: list[tuple[str, DataType]]) -> tuple[TensorSpec, ...]:
            if declared:
                return declared
            done = []
            for name, datatype in actual:
                dims = tuple(int(d) for d in engine.get_tensor_shape(name))
                done.append(TensorSpec(name, datatype, dims[1:] if spec.batches else dims))
            return tuple(done)

        completed = dataclasses.replace(spec, inputs=complete(spec.inputs, inputs),
                                        outputs=complete(spec.outputs, outputs))
        check_engine_against_spec(trt, engine, completed)
        return completed

    def engine(self, spec: ModelSpec, version_dir: Path, device: int = 0,
               rebuild: bool = False) -> tuple[EngineRecord, GpuIdentity]:
        """The engine bytes for ``device``: the version's plan, or the ONNX build (cached)."""
        trt, options, gpu = self._prepare(spec, device)
        if not options.build_from_onnx:
            path = model_file(spec, version_dir)
            if not path.is_file():
                raise ModelLoadError(f"model file '{path}' is missing")
            return EngineRecord(path.read_bytes(), "plan", path), gpu
        progress = BuildProgress(spec.name, self.progress_stream)
        return engine_from_onnx(trt, spec, version_dir, options, gpu, progress, rebuild), gpu

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> TensorRtInstance:
        device = instance_device(spec, instance_index)
        record, gpu = self.engine(spec, Path(version_dir), device)
        trt = import_tensorrt()
        options = parse_trt_options(spec.parameters, spec.name)
        runtime, engine = _deserialize(trt, record.data, record.path)
        if engine is None and record.source == "cache":
            log.warning("cached tensorrt engine does not deserialize; rebuilding",
                        extra={"model": spec.name, "engine": str(record.path)})
            record, gpu = self.engine(spec, Path(version_dir), device, rebuild=True)
            runtime, engine = _deserialize(trt, record.data, record.path)
        if engine is None:
            raise ModelLoadError(_not_deserialized(record.path))
        check_engine_against_spec(trt, engine, spec)
        instance = TensorRtInstance(trt, runtime, engine, spec, device, options, gpu, record)
        log.info("tensorrt instance loaded", extra={
            "model": spec.name, "instance": instance_index, "engine": str(record.path),
            "source": record.source, "runtime": instance.description,
        })
        return instance


def _not_deserialized(path: Path) -> str:
    return (f"TensorRT could not deserialize '{path}' (built by another TensorRT version or for "
            "another GPU? see the tensorrt log lines)")


def _deserialize(trt: Any, data: bytes, path: Path) -> tuple[Any, Any]:
    """(runtime, engine); engine None when TensorRT rejects the bytes (it logs why)."""
    runtime = trt.Runtime(trt_logger(trt))
    try:
        engine = runtime.deserialize_cuda_engine(data)
    except Exception as exc:
        log.error("tensorrt could not deserialize an engine",
                  extra={"engine": str(path), "error": str(exc)})
        engine = None
    return runtime, engine
