"""Building TensorRT engines from ``model.onnx`` and caching them (engine_cache.py says where
and under which key): one build per cache entry across threads and processes, the timing
cache reused across builds on one GPU."""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.accelerator_options import TrtOptions, optimisation_profile
from server.atomic_file import write_atomically
from server.backends.tensorrt.engine_cache import (
    BuildSettings,
    CacheEntry,
    GpuIdentity,
    build_lock,
    cache_entry,
    engine_cache_key,
    file_sha256,
    key_material,
    resolve_cache_dir,
    timing_cache_path,
)
from server.backends.tensorrt.progress import BuildProgress, progress_monitor, trt_logger
from server.errors import ModelLoadError
from server.security.paths import confined
from server.spec import ModelSpec

#: One logger for the whole backend, named as before its split into modules.
log = logging.getLogger(__package__)

_BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}


@dataclass(frozen=True, slots=True)
class EngineRecord:
    """Where an instance's engine came from."""

    data: bytes
    #: "plan" (the version's model.plan), "cache" (an engine built earlier) or "built" (now).
    source: str
    path: Path
    seconds: float = 0.0


_key_locks: dict[str, threading.Lock] = {}
_key_locks_guard = threading.Lock()


def _key_lock(key: str) -> threading.Lock:
    with _key_locks_guard:
        return _key_locks.setdefault(key, threading.Lock())


def build_settings(spec: ModelSpec, options: TrtOptions) -> BuildSettings:
    return BuildSettings(
        precision_flags=options.precision_flags,
        profile=optimisation_profile(spec, options.shapes),
        workspace_mb=options.workspace_mb,
        builder_optimization_level=options.builder_optimization_level,
    )


def model_file(spec: ModelSpec, version_dir: Path) -> Path:
    """The version's model file (``default_model_filename``), inside the version directory."""
    return confined(version_dir, spec.default_model_filename, "default_model_filename",
                    "the version directory")


def engine_from_onnx(
    trt: Any, spec: ModelSpec, version_dir: Path, options: TrtOptions, gpu: GpuIdentity,
    progress: BuildProgress | None = None, rebuild: bool = False,
) -> EngineRecord:
    """The cached engine for this model, TensorRT, GPU and settings; built when missing
    (or when ``rebuild``). Builds of one entry are serialised across threads and processes."""
    onnx_path = model_file(spec, version_dir)
    if not onnx_path.is_file():
        raise ModelLoadError(f"model file '{onnx_path}' is missing")
    cache_dir = resolve_cache_dir(options.engine_cache_dir, version_dir.parent)
    if cache_dir.resolve().is_relative_to(version_dir.resolve()):
        raise ModelLoadError(
            f"model '{spec.name}': trt_engine_cache_dir '{cache_dir}' is inside the version "
            "directory; new files there would look like a changed version (put it beside)"
        )
    settings = build_settings(spec, options)
    model_sha = file_sha256(onnx_path)
    key = engine_cache_key(model_sha, trt.__version__, gpu, settings)
    entry = cache_entry(cache_dir, spec.name, key)
    with _key_lock(key), build_lock(entry):
        if entry.plan.is_file() and not rebuild:
            log.info("tensorrt engine found in the cache",
                     extra={"model": spec.name, "engine": str(entry.plan)})
            return EngineRecord(entry.plan.read_bytes(), "cache", entry.plan)
        timing = (confined(version_dir.parent, options.timing_cache, "trt_timing_cache")
                  if options.timing_cache else timing_cache_path(cache_dir, gpu, trt.__version__))
        started = time.perf_counter()
        data = build_engine(trt, onnx_path, settings, timing, progress)
        seconds = time.perf_counter() - started
        _store(entry, data, key_material(model_sha, trt.__version__, gpu, settings), seconds)
        log.info("tensorrt engine built", extra={
            "model": spec.name, "engine": str(entry.plan), "seconds": round(seconds, 1),
            "precision": options.precision_name, "gpu": gpu.name,
        })
        return EngineRecord(data, "built", entry.plan, seconds)


def _store(entry: CacheEntry, data: bytes, material: dict[str, Any], seconds: float) -> None:
    write_atomically(entry.plan, data)
    meta = dict(material, key=entry.key, build_seconds=round(seconds, 3), bytes=len(data))
    write_atomically(entry.metadata, (json.dumps(meta, indent=2, sort_keys=True) + "\n").encode())


def build_engine(trt: Any, onnx_path: Path, settings: BuildSettings, timing_path: Path,
                 progress: BuildProgress | None) -> bytes:
    """Parse ``onnx_path`` and build a serialized engine. Blocking (seconds to minutes)."""
    logger = trt_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(0)  # TensorRT 10: explicit batch is the only mode
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = []
        for i in range(parser.num_errors):
            error = parser.get_error(i)
            errors.append(error.desc() if hasattr(error, "desc") else str(error))
        raise ModelLoadError(f"TensorRT could not parse '{onnx_path}': {'; '.join(errors)}")
    if "int8" in settings.precision_flags:
        require_quantized(trt, network, onnx_path)
    config = builder.create_builder_config()
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    set_precision(trt, config, settings.precision_flags)
    if settings.builder_optimization_level is not None:
        config.builder_optimization_level = settings.builder_optimization_level
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        shape_range = settings.profile.get(tensor.name)
        if shape_range is None:
            raise ModelLoadError(
                f"'{onnx_path}' has input '{tensor.name}' that the model config does not declare"
            )
        if len(tuple(tensor.shape)) != len(shape_range.min):
            raise ModelLoadError(
                f"'{onnx_path}' input '{tensor.name}' has shape {list(tensor.shape)}; the "
                f"profile from the config has rank {len(shape_range.min)}"
            )
        profile.set_shape(tensor.name, shape_range.min, shape_range.opt, shape_range.max)
    config.add_optimization_profile(profile)
    timing = _timing_cache(config, timing_path)
    monitor = None
    if progress is not None:
        monitor = progress_monitor(trt, progress)
        if monitor is not None:
            config.progress_monitor = monitor
    try:
        serialized = builder.build_serialized_network(network, config)
    finally:
        if progress is not None:
            progress.finish()
    if serialized is None:
        raise ModelLoadError(
            f"TensorRT could not build an engine from '{onnx_path}' (see the tensorrt log lines "
            "above for why)"
        )
    if timing is not None:
        save_timing_cache(config, timing_path)
    return bytes(memoryview(serialized))


def set_precision(trt: Any, config: Any, precision_flags: tuple[str, ...]) -> None:
    """The builder flags of ``trt_precision`` (the precision contract, server/
    accelerator_options.py): each reduced precision's flag; for plain fp32 (no flag) TF32 is
    cleared, which TensorRT sets by default, so an "fp32" engine computes in IEEE FP32."""
    if not precision_flags:
        tf32 = getattr(trt.BuilderFlag, "TF32", None)
        if tf32 is not None:  # a TensorRT without the flag has no TF32 to turn off
            config.clear_flag(tf32)
        return
    for precision in precision_flags:
        flag = getattr(trt.BuilderFlag, _BUILDER_FLAGS[precision], None)
        if flag is None:
            raise ModelLoadError(
                f"TensorRT {trt.__version__} has no {_BUILDER_FLAGS[precision]} builder flag "
                "(TensorRT 11 builds strongly typed networks only): give an ONNX model already "
                f"in {precision} with trt_precision fp32, or install tensorrt 10 (the 'gpu' extra)"
            )
        config.set_flag(flag)


def require_quantized(trt: Any, network: Any, onnx_path: Path) -> None:
    """INT8 without a calibrator (we have none) needs explicit quantisation: the model must
    carry QuantizeLinear/DequantizeLinear nodes, which TensorRT parses into Q/DQ layers.
    Without them the build fails deep inside TensorRT; refuse it here, saying why."""
    kinds = {trt.LayerType.QUANTIZE, trt.LayerType.DEQUANTIZE}
    if any(network.get_layer(i).type in kinds for i in range(network.num_layers)):
        return
    raise ModelLoadError(
        f"trt_precision int8 needs a quantised model: '{onnx_path}' has no "
        "QuantizeLinear/DequantizeLinear nodes and no calibrator is supported; quantise it "
        "first (Q/DQ format, e.g. onnxruntime.quantization.quantize_static) or use fp16"
    )


def save_timing_cache(config: Any, path: Path) -> bool:
    """Write the builder's timing cache; True when written. Never raises: the engine just
    built is worth more than the cache, so a missing cache (``get_timing_cache`` gives None
    when ``set_timing_cache`` did not take) or a failed write or serialisation is a warning."""
    try:
        cache = config.get_timing_cache()
        if cache is None:
            log.warning("tensorrt timing cache not saved: the builder has none",
                        extra={"path": str(path)})
            return False
        write_atomically(path, memoryview(cache.serialize()))
    except Exception as exc:
        log.warning("tensorrt timing cache not saved",
                    extra={"path": str(path), "error": repr(exc)})
        return False
    return True


def _timing_cache(config: Any, path: Path) -> Any:
    """The timing cache the build uses (read from ``path``, or a new one), set on ``config``;
    None when the builder would not take one."""
    data = b""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        pass
    except OSError as exc:
        log.warning("tensorrt timing cache unreadable; starting a new one",
                    extra={"path": str(path), "error": str(exc)})
    try:
        cache = config.create_timing_cache(data)
    except Exception:  # a corrupt or foreign file: start afresh
        log.warning("tensorrt timing cache rejected; starting a new one", extra={"path": str(path)})
        cache = config.create_timing_cache(b"")
    if cache is None:
        return None
    try:
        taken = config.set_timing_cache(cache, False)
    except Exception as exc:
        taken = False
        log.warning("tensorrt timing cache not used", extra={"path": str(path),
                                                            "error": repr(exc)})
    # TensorRT 10 answers False when the cache does not fit this builder (another version or
    # device): build without it and do not write it back.
    return cache if taken is not False else None
