"""Native TensorRT backend: serves ``model.plan`` engines, or builds (and caches) them from
``model.onnx`` when the config asks (``trt_build_from_onnx: "true"``).

TensorRT and cuda-python come with the `gpu` extra and are imported only when a TensorRT model
loads: without them, or without a CUDA device, loading fails with a clear ModelLoadError
(``tensorrt is not installed`` / ``no CUDA device``), never a silent fallback to the CPU.

Per instance: its own engine (deserialized once per instance, so no two execution contexts
ever share an optimisation profile), one execution context, one non-blocking CUDA stream,
device buffers and page-locked host staging buffers sized for the profile's largest shapes.
A batch is: inputs copied into the pinned staging buffers (skipped when the packer's buffer is
already pinned), async copies to the device, ``execute_async_v3`` (or the batch shape's CUDA
graph), async copies back, one stream synchronisation, and outputs copied out of the staging
buffers (the next batch reuses them). See server/accelerator_options.py for the parameters and
engine_cache.py (beside this file) for the engine cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from server.accelerator_options import (
    TRT_KEYS,
    TrtOptions,
    instance_device,
    optimisation_profile,
    parse_trt_options,
)
from server.atomic_file import write_atomically
from server.backends.onnxruntime import OnnxRuntimeFactory
from server.backends.tensorrt import cuda
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
from server.errors import BackendError, InvalidInput, ModelLoadError
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType

log = logging.getLogger(__name__)

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
_BUILDER_FLAGS = {"fp16": "FP16", "bf16": "BF16", "int8": "INT8"}
#: Most distinct batch shapes one instance captures CUDA graphs for.
MAX_GRAPHS = 64


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


# -- logging and build progress --------------------------------------------------------------

_logger_lock = threading.Lock()
_trt_logger: Any = None


def trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger that forwards to Python logging."""
    global _trt_logger
    with _logger_lock:
        if _trt_logger is None:
            severity = trt.ILogger.Severity
            levels = {
                severity.INTERNAL_ERROR: logging.CRITICAL,
                severity.ERROR: logging.ERROR,
                severity.WARNING: logging.WARNING,
                severity.INFO: logging.DEBUG,
                severity.VERBOSE: logging.DEBUG,
            }

            class Logger(trt.ILogger):  # type: ignore[misc]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, sev: Any, msg: str) -> None:
                    log.log(levels.get(sev, logging.INFO), "tensorrt: %s", msg)

            _trt_logger = Logger()
        return _trt_logger


class BuildProgress:
    """Build progress from TensorRT's IProgressMonitor callbacks (called from TensorRT's
    threads): a bar on ``stream`` (the CLI) and INFO logs at most every ``log_every_s``.

    ``step_complete`` returns False once ``cancel()`` was called, which stops the build.
    """

    def __init__(self, label: str, stream: TextIO | None = None, log_every_s: float = 5.0,
                 width: int = 30) -> None:
        self.label = label
        self._stream = stream
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._log_every = log_every_s
        self._width = width
        self._lock = threading.Lock()
        self._phases: dict[str, list[Any]] = {}  # name -> [parent, steps, done]
        self._started = time.monotonic()
        self._last_log = 0.0
        self._cancelled = False
        self.events = 0

    def cancel(self) -> None:
        self._cancelled = True

    def phase_start(self, name: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self.events += 1
            self._phases[name] = [parent, max(1, int(steps)), 0]
            if parent is None:
                log.info("tensorrt build phase", extra={"model": self.label, "phase": name,
                                                       "steps": steps})
                if self._stream is not None and not self._tty:
                    print(f"{self.label}: {name} ({steps} steps)", file=self._stream, flush=True)
            self._draw()

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            self.events += 1
            phase = self._phases.get(name)
            if phase is not None:
                phase[2] = int(step) + 1
            now = time.monotonic()
            if now - self._last_log >= self._log_every:
                self._last_log = now
                log.info("tensorrt build progress", extra={
                    "model": self.label, "phase": self.line(), "seconds": round(now -
                                                                              self._started)})
            self._draw()
            return not self._cancelled

    def phase_finish(self, name: str) -> None:
        with self._lock:
            self.events += 1
            phase = self._phases.pop(name, None)
            if phase is not None and phase[0] is None and self._tty and self._stream is not None:
                self._stream.write("\r\x1b[2K")
                self._stream.flush()
            self._draw()

    def line(self) -> str:
        """The innermost running phase as ``[#####-----] phase 5/10``; empty when idle."""
        if not self._phases:
            return ""
        name, (_, steps, done) = next(reversed(self._phases.items()))
        filled = min(self._width, self._width * done // steps)
        bar = "#" * filled + "-" * (self._width - filled)
        return f"[{bar}] {name} {min(done, steps)}/{steps}"

    def finish(self) -> None:
        if self._tty and self._stream is not None:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()

    def _draw(self) -> None:
        if not self._tty or self._stream is None:
            return
        elapsed = time.monotonic() - self._started
        text = f"{self.label}: {self.line()} {elapsed:.0f}s"
        self._stream.write("\r\x1b[2K" + text[:200])
        self._stream.flush()


def progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A trt.IProgressMonitor forwarding to ``progress``; None where TensorRT has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with contextlib.suppress(Exception):  # a display problem must not break a build
                progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return progress.step_complete(phase_name, step)
            except Exception:
                return True

        def phase_finish(self, phase_name: str) -> None:
            with contextlib.suppress(Exception):
                progress.phase_finish(phase_name)

    return Monitor()


# -- building and caching engines ------------------------------------------------------------


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


def engine_from_onnx(
    trt: Any, spec: ModelSpec, version_dir: Path, options: TrtOptions, gpu: GpuIdentity,
    progress: BuildProgress | None = None, rebuild: bool = False,
) -> EngineRecord:
    """The cached engine for this model, TensorRT, GPU and settings; built when missing
    (or when ``rebuild``). Builds of one entry are serialised across threads and processes."""
    onnx_path = version_dir / spec.default_model_filename
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
        timing = (Path(options.timing_cache).expanduser() if options.timing_cache
                  else timing_cache_path(cache_dir, gpu, trt.__version__))
        if not timing.is_absolute():
            timing = version_dir.parent / timing
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
    config = builder.create_builder_config()
    if settings.workspace_mb is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    for precision in settings.precision_flags:
        flag = getattr(trt.BuilderFlag, _BUILDER_FLAGS[precision], None)
        if flag is None:
            raise ModelLoadError(
                f"TensorRT {trt.__version__} has no {_BUILDER_FLAGS[precision]} builder flag "
                "(TensorRT 11 builds strongly typed networks only): give an ONNX model already "
                f"in {precision} with trt_precision fp32, or install tensorrt 10 (the 'gpu' extra)"
            )
        config.set_flag(flag)
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
        try:
            write_atomically(timing_path, memoryview(config.get_timing_cache().serialize()))
        except OSError as exc:
            log.warning("tensorrt timing cache not saved",
                        extra={"path": str(timing_path), "error": str(exc)})
    return bytes(memoryview(serialized))


def _timing_cache(config: Any, path: Path) -> Any:
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
    config.set_timing_cache(cache, False)
    return cache


# -- the instance ----------------------------------------------------------------------------


@dataclass(slots=True)
class _Binding:
    name: str
    datatype: DataType
    dtype: np.dtype[Any]
    capacity: int  # bytes in both buffers
    device: cuda.DeviceBuffer
    host: cuda.PinnedBuffer


class TensorRtInstance:
    """One engine, execution context and stream. Blocking; never run concurrently.

    With ``trt_cuda_graphs`` every batch shape gets, on first use, its own execution context
    (fixed to that shape) and a CUDA graph of its enqueue; later batches of that shape replay
    the graph. A graph fixes its context's shapes, so one shared context could not replay
    graphs of several shapes. All contexts share one scratch allocation (they run one at a
    time on the instance's stream), so graphs cost no activation memory. A shape whose
    enqueue cannot be captured runs on the main context, as it would without graphs.
    """

    def __init__(self, trt: Any, runtime: Any, engine: Any, spec: ModelSpec, device: int,
                 options: TrtOptions, gpu: GpuIdentity, record: EngineRecord) -> None:
        self._trt = trt
        self._device = device
        self._runtime = runtime  # outlives the engine
        self._engine = engine
        self._graphs_on = options.cuda_graphs
        self._bindings: list[_Binding] = []
        self._graphs: dict[tuple[tuple[int, ...], ...], tuple[Any, cuda.Graph]] = {}
        self._uncapturable: set[tuple[tuple[int, ...], ...]] = set()
        self._stream: cuda.Stream | None = None
        self._scratch: cuda.DeviceBuffer | None = None
        self._context: Any = None
        try:
            self._setup(trt, engine, spec)
        except BaseException:
            self.close()
            raise
        flags = [options.precision_name] if record.source != "plan" else ["plan"]
        if self._graphs_on:
            flags.append("cuda graphs")
        self._description = (f"tensorrt {trt.__version__} ({', '.join(flags)}) on cuda:{device} "
                             f"{gpu.name} sm{gpu.compute_capability[0]}{gpu.compute_capability[1]}")

    def _new_context(self) -> Any:
        """A context without its own scratch memory, using the instance's shared one."""
        trt, engine = self._trt, self._engine
        strategy = getattr(trt, "ExecutionContextAllocationStrategy", None)
        if strategy is not None:
            context = engine.create_execution_context(strategy.USER_MANAGED)
        else:
            context = engine.create_execution_context_without_device_memory()
        if context is None:
            return None
        if self._scratch is None:
            size = getattr(engine, "device_memory_size_v2", None)
            if size is None:
                size = engine.device_memory_size
            self._scratch = cuda.DeviceBuffer(int(size))
        if hasattr(context, "set_device_memory"):
            context.set_device_memory(self._scratch.ptr, self._scratch.nbytes)
        else:
            context.device_memory = self._scratch.ptr
        return context

    def _setup(self, trt: Any, engine: Any, spec: ModelSpec) -> None:
        context = self._new_context() if self._graphs_on else engine.create_execution_context()
        if context is None:
            raise ModelLoadError(
                f"model '{spec.name}': TensorRT could not create an execution context (out of "
                "GPU memory?)"
            )
        self._context = context
        self._stream = cuda.Stream()
        inputs, outputs = engine_io(trt, engine)
        self._inputs_order = [name for name, _ in inputs]
        self._outputs_order = [name for name, _ in outputs]
        #: (min, max) full shapes of each input in profile 0.
        self._limits: dict[str, tuple[tuple[int, ...], tuple[int, ...]]] = {}
        for name, _ in inputs:
            low, _opt, high = (tuple(int(d) for d in s)
                               for s in engine.get_tensor_profile_shape(name, 0))
            self._limits[name] = (low, high)
            if not context.set_input_shape(name, high):
                raise ModelLoadError(f"TensorRT refused the profile's max shape for '{name}'")
        out_max = {name: tuple(int(d) for d in context.get_tensor_shape(name))
                   for name, _ in outputs}
        for name, shape in out_max.items():
            if any(d < 0 for d in shape):
                raise ModelLoadError(
                    f"model '{spec.name}' output '{name}' has a data-dependent shape "
                    f"{list(shape)}; this backend needs output shapes that follow from the "
                    "input shapes"
                )
        for name, datatype in [*inputs, *outputs]:
            shape = self._limits[name][1] if name in self._limits else out_max[name]
            nbytes = _volume(shape) * datatype.numpy_dtype.itemsize
            device_buffer = cuda.DeviceBuffer(nbytes)
            try:
                host_buffer = cuda.PinnedBuffer(nbytes)
            except BaseException:
                device_buffer.free()
                raise
            self._bindings.append(_Binding(name, datatype, datatype.numpy_dtype, nbytes,
                                           device_buffer, host_buffer))
            context.set_tensor_address(name, device_buffer.ptr)
        self._by_name = {b.name: b for b in self._bindings}
        self._shapes: tuple[tuple[int, ...], ...] | None = None
        self._output_shapes: dict[tuple[tuple[int, ...], ...], list[tuple[int, ...]]] = {}

    @property
    def description(self) -> str:
        return self._description

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        self.execute(inputs)

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        stream = self._stream
        assert stream is not None
        cuda.set_device(self._device)
        arrays = []
        for name in self._inputs_order:
            value = inputs.get(name)
            if value is None:
                raise InvalidInput(f"input '{name}' is required by the TensorRT engine")
            binding = self._by_name[name]
            array = np.ascontiguousarray(value, dtype=binding.dtype)
            low, high = self._limits[name]
            if len(array.shape) != len(high) or any(
                not lo <= d <= hi for lo, d, hi in zip(low, array.shape, high, strict=True)
            ):
                raise InvalidInput(
                    f"input '{name}' has shape {list(array.shape)}; the TensorRT engine takes "
                    f"{list(low)} to {list(high)}"
                )
            arrays.append(array)
        key = tuple(tuple(a.shape) for a in arrays)
        output_shapes = self._prepare(key)
        for name, array in zip(self._inputs_order, arrays, strict=True):
            binding = self._by_name[name]
            if array.nbytes == 0:
                continue
            if cuda.is_pinned(array):
                source = int(array.ctypes.data)
            else:
                staged = binding.host.view(binding.dtype, array.shape)
                np.copyto(staged, array, casting="no")
                source = binding.host.ptr
            stream.copy_to_device(binding.device.ptr, source, array.nbytes)
        self._run(key)
        for name, shape in zip(self._outputs_order, output_shapes, strict=True):
            binding = self._by_name[name]
            nbytes = _volume(shape) * binding.dtype.itemsize
            if nbytes:
                stream.copy_to_host(binding.host.ptr, binding.device.ptr, nbytes)
        stream.synchronize()
        return {
            name: binding.host.view(binding.dtype, shape).copy()
            for name, shape in zip(self._outputs_order, output_shapes, strict=True)
            for binding in (self._by_name[name],)
        }

    def _prepare(self, key: tuple[tuple[int, ...], ...]) -> list[tuple[int, ...]]:
        """Output shapes for input shapes ``key``, setting the context's shapes on a change."""
        known = self._output_shapes.get(key)
        if known is not None and (self._shapes == key or key in self._graphs):
            return known
        if self._shapes != key:
            for name, shape in zip(self._inputs_order, key, strict=True):
                if not self._context.set_input_shape(name, shape):
                    raise InvalidInput(f"TensorRT refused shape {list(shape)} for input '{name}'")
            self._shapes = key
        if known is None:
            known = [tuple(int(d) for d in self._context.get_tensor_shape(name))
                     for name in self._outputs_order]
            for name, shape in zip(self._outputs_order, known, strict=True):
                binding = self._by_name[name]
                if (any(d < 0 for d in shape)
                        or _volume(shape) * binding.dtype.itemsize > binding.capacity):
                    raise BackendError(
                        f"TensorRT output '{name}' has shape {list(shape)}, beyond the buffers "
                        "sized from the profile's largest inputs"
                    )
            self._output_shapes[key] = known
        return known

    def _run(self, key: tuple[tuple[int, ...], ...]) -> None:
        stream = self._stream
        assert stream is not None
        captured = self._graphs.get(key)
        if captured is not None:
            captured[1].launch(stream)
            return
        if (self._graphs_on and key not in self._uncapturable
                and len(self._graphs) < MAX_GRAPHS and self._run_and_capture(key)):
            return
        if not self._context.execute_async_v3(stream.ptr):
            raise BackendError("TensorRT execute_async_v3 failed (see the tensorrt log)")

    def _run_and_capture(self, key: tuple[tuple[int, ...], ...]) -> bool:
        """Run this batch on a new context fixed to its shapes, then record that context's
        enqueue as a CUDA graph for the next batches of the shape (TensorRT wants one
        enqueue after a shape change before a capture: the run is it). False when the
        context cannot be made; the batch then still has to run."""
        stream = self._stream
        assert stream is not None
        self._uncapturable.add(key)  # until captured: one attempt per shape
        context = self._new_context()
        if context is None:
            return False
        for name, shape in zip(self._inputs_order, key, strict=True):
            if not context.set_input_shape(name, shape):
                return False
        for binding in self._bindings:
            context.set_tensor_address(binding.name, binding.device.ptr)
        if not context.execute_async_v3(stream.ptr):
            raise BackendError("TensorRT execute_async_v3 failed (see the tensorrt log)")
        try:
            graph = cuda.Graph.capture(stream, lambda: context.execute_async_v3(stream.ptr))
        except cuda.CudaError as exc:
            graph = None
            log.warning("cuda graph capture failed", extra={"error": str(exc)})
        if graph is None:
            log.info("tensorrt runs this shape without a cuda graph (not capturable)",
                     extra={"shapes": str(key)})
            return True
        self._uncapturable.discard(key)
        self._graphs[key] = (context, graph)
        return True

    def close(self) -> None:
        with contextlib.suppress(Exception):
            cuda.set_device(self._device)
        if self._stream is not None:
            with contextlib.suppress(cuda.CudaError):
                self._stream.synchronize()
        for _context, graph in self._graphs.values():
            graph.destroy()
        self._graphs.clear()
        self._context = None
        for binding in self._bindings:
            binding.device.free()
            binding.host.free()
        self._bindings.clear()
        if self._scratch is not None:
            self._scratch.free()
            self._scratch = None
        if self._stream is not None:
            self._stream.destroy()
            self._stream = None
        self._engine = None
        self._runtime = None


def _volume(shape: tuple[int, ...]) -> int:
    count = 1
    for d in shape:
        count *= d
    return count


def engine_io(
    trt: Any, engine: Any
) -> tuple[list[tuple[str, DataType]], list[tuple[str, DataType]]]:
    """(inputs, outputs) of an engine as (name, datatype), in the engine's order."""
    inputs: list[tuple[str, DataType]] = []
    outputs: list[tuple[str, DataType]] = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        if hasattr(engine, "is_shape_inference_io") and engine.is_shape_inference_io(name):
            raise ModelLoadError(f"TensorRT engine tensor '{name}' is a shape tensor; not "
                                 "supported")
        datatype = datatype_of(engine.get_tensor_dtype(name))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            inputs.append((name, datatype))
        else:
            outputs.append((name, datatype))
    return inputs, outputs


def check_engine_against_spec(trt: Any, engine: Any, spec: ModelSpec) -> None:
    """The config's tensors must be the engine's, with the same types and compatible dims,
    and the engine's profile must cover 1..max_batch_size."""
    inputs, outputs = engine_io(trt, engine)
    declared_in = {t.name: t for t in spec.inputs}
    engine_in = dict(inputs)
    if set(declared_in) != set(engine_in):
        raise ModelLoadError(
            f"model '{spec.name}': config inputs {sorted(declared_in)} differ from the TensorRT "
            f"engine's {sorted(engine_in)}"
        )
    engine_out = dict(outputs)
    for tensor in spec.outputs:
        if tensor.name not in engine_out:
            raise ModelLoadError(
                f"model '{spec.name}': config output '{tensor.name}' is not in the TensorRT "
                f"engine; its outputs are {sorted(engine_out)}"
            )
    for kind, tensors, types in (("input", spec.inputs, engine_in),
                                 ("output", spec.outputs, engine_out)):
        for tensor in tensors:
            if types[tensor.name] is not tensor.datatype:
                raise ModelLoadError(
                    f"model '{spec.name}' {kind} '{tensor.name}' is "
                    f"{tensor.datatype.config_name} in the config but "
                    f"{types[tensor.name].config_name} in the TensorRT engine"
                )
            _check_dims(spec, kind, tensor, tuple(int(d) for d in
                                                  engine.get_tensor_shape(tensor.name)))
    if spec.batches:
        for tensor in spec.inputs:
            low, _opt, high = engine.get_tensor_profile_shape(tensor.name, 0)
            if int(low[0]) > 1 or int(high[0]) < spec.max_batch_size:
                raise ModelLoadError(
                    f"model '{spec.name}': the TensorRT engine's profile takes batches of "
                    f"{int(low[0])} to {int(high[0])} rows for input '{tensor.name}', but the "
                    f"config's max_batch_size is {spec.max_batch_size} (rebuild the engine or "
                    "lower max_batch_size)"
                )


def _check_dims(spec: ModelSpec, kind: str, tensor: TensorSpec, shape: tuple[int, ...]) -> None:
    dims = list(shape)
    if spec.batches:
        if not dims or dims[0] != -1:
            raise ModelLoadError(
                f"model '{spec.name}' {kind} '{tensor.name}' has engine shape {list(shape)}: "
                "with max_batch_size > 0 its first dimension must be dynamic (the batch)"
            )
        dims = dims[1:]
    expected = list(tensor.dims)
    if len(dims) != len(expected) or any(
        e != -1 and m != -1 and e != m for m, e in zip(dims, expected, strict=True)
    ):
        raise ModelLoadError(
            f"model '{spec.name}' {kind} '{tensor.name}': config dims {expected} do not match "
            f"the TensorRT engine's {dims}" + (" (batch dimension excluded)" if spec.batches
                                               else "")
        )


# -- the factory -----------------------------------------------------------------------------


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
        path = Path(version_dir) / spec.default_model_filename
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
            path = version_dir / spec.default_model_filename
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
