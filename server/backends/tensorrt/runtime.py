"""One TensorRT instance: its engine, execution context, CUDA stream, device and pinned
staging buffers (and CUDA graphs per batch shape); and the checks of an engine against the
model config."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.accelerator_options import TrtOptions
from server.backends.shapes import check_dims
from server.backends.tensorrt import cuda
from server.backends.tensorrt.builder import EngineRecord
from server.backends.tensorrt.engine_cache import GpuIdentity
from server.backends.tensorrt.library import datatype_of
from server.errors import BackendError, InvalidInput, ModelLoadError
from server.spec import ModelSpec
from server.types import Array, DataType

#: One logger for the whole backend, named as before its split into modules.
log = logging.getLogger(__package__)

#: Most distinct batch shapes one instance captures CUDA graphs for.
MAX_GRAPHS = 64


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

    def host_allocator(self, nbytes: int) -> Array:
        """The version's batch buffers: page-locked, so they copy to the device unstaged."""
        return cuda.pinned_allocator(nbytes)

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
            check_dims(spec, kind, tensor, tuple(int(d) for d in
                                                 engine.get_tensor_shape(tensor.name)),
                       "the TensorRT engine")
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
