"""ONNX Runtime backend: one InferenceSession per instance, options from config parameters."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from server.accelerator_options import (
    ORT_GPU_KEYS,
    TRT_CUDA_GRAPHS,
    instance_device,
    instance_group,
    ort_gpu_providers,
    parse_ort_gpu_options,
    require_fixed_shapes,
)
from server.backends.fixed_binding import FixedBinding
from server.backends.shapes import check_dims
from server.errors import InvalidInput, ModelLoadError
from server.parameters import Key, boolean, choice, integer, optional
from server.security.paths import confined
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType

log = logging.getLogger(__name__)

_ORT_TYPES: dict[str, DataType] = {
    "tensor(bool)": DataType.BOOL,
    "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16,
    "tensor(uint32)": DataType.UINT32,
    "tensor(uint64)": DataType.UINT64,
    "tensor(int8)": DataType.INT8,
    "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32,
    "tensor(int64)": DataType.INT64,
    "tensor(float16)": DataType.FP16,
    "tensor(float)": DataType.FP32,
    "tensor(double)": DataType.FP64,
    "tensor(string)": DataType.BYTES,
    "tensor(bfloat16)": DataType.BF16,
}

#: onnx.TensorProto.BFLOAT16: numpy has no bfloat16, so such tensors travel as raw uint16 words.
_ONNX_BFLOAT16 = 16

_OPTIMIZATION_LEVELS = {
    "disable_all": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}

INTRA_OP_THREADS = Key("intra_op_thread_count", optional(integer(0)),
                       "threads one operator may use (onnxruntime's default when unset)")
INTER_OP_THREADS = Key("inter_op_thread_count", optional(integer(0)),
                       "threads that run operators in parallel (execution_mode parallel)")
GRAPH_OPTIMIZATION_LEVEL = Key("graph_optimization_level", choice(*_OPTIMIZATION_LEVELS),
                               "graph optimisations: disable_all, basic, extended or all", "all")
EXECUTION_MODE = Key("execution_mode", choice("sequential", "parallel"),
                     "run operators one at a time or in parallel", "sequential")
ALLOW_SPINNING = Key("allow_spinning", boolean,
                     "idle session threads spin (lower latency, busy CPU) before sleeping", "true")
ALLOW_CPU_FALLBACK = Key("allow_cpu_fallback", boolean,
                         "a KIND_GPU instance may run on the CPU when CUDA is missing", "false")
#: config.pbtxt ``parameters`` keys this backend owns.
PARAMETER_KEYS = (INTRA_OP_THREADS, INTER_OP_THREADS, GRAPH_OPTIMIZATION_LEVEL, EXECUTION_MODE,
                  ALLOW_SPINNING, ALLOW_CPU_FALLBACK, *ORT_GPU_KEYS)


def session_options(spec: ModelSpec) -> ort.SessionOptions:
    params, model = spec.parameters, spec.name
    options = ort.SessionOptions()
    intra = INTRA_OP_THREADS.value(params, model)
    if intra is not None:
        options.intra_op_num_threads = intra
    inter = INTER_OP_THREADS.value(params, model)
    if inter is not None:
        options.inter_op_num_threads = inter
    options.graph_optimization_level = _OPTIMIZATION_LEVELS[
        GRAPH_OPTIMIZATION_LEVEL.value(params, model)]
    options.execution_mode = (
        ort.ExecutionMode.ORT_PARALLEL
        if EXECUTION_MODE.value(params, model) == "parallel"
        else ort.ExecutionMode.ORT_SEQUENTIAL
    )
    spinning = "1" if ALLOW_SPINNING.value(params, model) else "0"
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return options


def choose_providers(
    spec: ModelSpec, instance_index: int, model_dir: Path
) -> list[str | tuple[str, dict[str, Any]]]:
    """Execution providers for one instance from its instance_group kind and what is installed
    (the TensorRT provider's cache paths inside ``model_dir``).

    KIND_GPU (or KIND_AUTO where CUDA is present) runs on the CUDA provider of the group's
    next GPU, or on the TensorRT provider with parameter ``execution_accelerator: tensorrt``;
    provider options come from the config parameters (server/accelerator_options.py).
    KIND_GPU without CUDA is a load error unless ``allow_cpu_fallback`` is true.
    """
    available = ort.get_available_providers()
    group, _ = instance_group(spec, instance_index)
    has_cuda = "CUDAExecutionProvider" in available
    if group.kind == "CPU" or (group.kind == "AUTO" and not has_cuda):
        return ["CPUExecutionProvider"]
    if not has_cuda:
        if ALLOW_CPU_FALLBACK.value(spec.parameters, spec.name):
            log.warning(
                "KIND_GPU requested without CUDA; falling back to CPU as the config allows",
                extra={"model": spec.name},
            )
            return ["CPUExecutionProvider"]
        raise ModelLoadError(
            f"instance_group kind KIND_GPU needs onnxruntime's CUDAExecutionProvider, but this "
            f"installation provides only {available}; install the 'gpu' extra on a CUDA machine "
            "or set the config parameter allow_cpu_fallback to \"true\""
        )
    options = parse_ort_gpu_options(spec.parameters, spec.name)
    return ort_gpu_providers(spec, options, instance_device(spec, instance_index), available,
                             model_dir)


def _provider_name(provider: str | tuple[str, dict[str, Any]]) -> str:
    return provider if isinstance(provider, str) else provider[0]


def _device_of(providers: list[str | tuple[str, dict[str, Any]]]) -> int | None:
    """The CUDA device the providers run on, or None on the CPU."""
    for provider in providers:
        if not isinstance(provider, str) and "device_id" in provider[1]:
            return int(provider[1]["device_id"])
    return None


class OnnxRuntimeInstance:
    """One InferenceSession. Blocking calls; the scheduler never runs one concurrently.

    Every run goes through the instance's one RunOptions, so ``cancel`` (another thread) can
    set its terminate flag: onnxruntime checks it between nodes, and inside Loop and Scan
    bodies, and the run raises. A single long kernel runs to its end first.
    """

    def __init__(
        self, session: ort.InferenceSession, spec: ModelSpec, device: int | None = None
    ) -> None:
        self._session = session
        self._run_options = ort.RunOptions()
        #: Set by ``cancel``; the next run clears RunOptions.terminate first.
        self._cancelled = False
        #: The CUDA device the session runs on (IO binding then), None on the CPU.
        self._device = device
        self._output_names = [o.name for o in session.get_outputs()]
        self._string_inputs = frozenset(
            t.name for t in spec.inputs if t.datatype is DataType.BYTES
        )
        self._string_outputs = frozenset(
            t.name for t in spec.outputs if t.datatype is DataType.BYTES
        )
        # numpy has no bfloat16: BF16 tensors travel as uint16 words (IO binding).
        self._bf16_inputs = frozenset(t.name for t in spec.inputs if t.datatype is DataType.BF16)
        self._bf16_outputs = frozenset(
            t.name for t in spec.outputs if t.datatype is DataType.BF16
        )
        if (self._bf16_inputs or self._bf16_outputs) and (
            self._string_inputs or self._string_outputs
        ):
            raise ModelLoadError(
                f"model '{spec.name}' mixes BF16 and BYTES tensors, which this backend "
                "cannot feed to onnxruntime together"
            )
        self._description = "onnxruntime " + ",".join(session.get_providers())
        if device is not None:
            self._description += f" on cuda:{device}"
        # On a GPU, IO binding: inputs bound from host memory (copied to the device once),
        # outputs left on the device and copied back once. String tensors stay on session.run
        # (they never live on a GPU); BF16 models keep their own bound path.
        self._bind_gpu = (device is not None and not self._bf16_inputs
                          and not self._bf16_outputs and not self._string_inputs
                          and not self._string_outputs)
        # trt_cuda_graphs: the TensorRT provider replays one graph over the addresses it was
        # captured with, so the IO stays in buffers allocated once (fixed shapes only).
        self._fixed: FixedBinding | None = None
        if TRT_CUDA_GRAPHS.value(spec.parameters, spec.name):
            if self._bf16_inputs or self._bf16_outputs or self._string_inputs \
                    or self._string_outputs:
                raise ModelLoadError(f"model '{spec.name}': trt_cuda_graphs needs tensors of "
                                     "numpy types (no BF16 or BYTES)")
            self._fixed = FixedBinding(session, spec, "cpu" if device is None else "cuda",
                                       device or 0)
        # On the CPU, with numpy types only, a run calls the session's C++ binding directly:
        # InferenceSession.run first checks, in Python, for graph-capture options, OrtValue
        # inputs owned elsewhere and missing inputs, and retries on a provider failure with
        # its fallback providers. None of that applies to validated numpy inputs on the
        # CPU (the binding itself still refuses a missing input), and the checks cost about
        # 5 us a run: 8% of an MLP batch of 64 (bench/studies/batch_scoring.py). Every
        # output must be a tensor: a sequence or map (an undeclared ZipMap, say) comes back
        # as a list, which the general path turns into an array.
        plain = (device is None and self._fixed is None and not self._bf16_inputs
                 and not self._bf16_outputs and not self._string_inputs
                 and not self._string_outputs
                 and all(o.type in _ORT_TYPES for o in session.get_outputs()))
        self._plain_run = getattr(session, "_sess", session).run if plain else None

    @property
    def description(self) -> str:
        return self._description

    @property
    def session(self) -> ort.InferenceSession:
        """The ONNX Runtime session (benchmarks call it directly, as a user's loop would)."""
        return self._session

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        self.execute(inputs)

    def cancel(self) -> None:
        # terminate first: a run that sees the mark cleared also clears terminate after it.
        self._run_options.terminate = True
        self._cancelled = True

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        if self._cancelled:
            # A cancel that came after the previous run ended must not stop this one. Only
            # then is the flag written: writing it costs about 1 us, 1.5% of an MLP batch.
            self._cancelled = False
            self._run_options.terminate = False
        if self._plain_run is not None:
            return dict(zip(self._output_names, self._plain_run(
                self._output_names, dict(inputs), self._run_options), strict=True))
        if self._fixed is not None:
            return self._fixed.run(inputs, self._run_options)
        if self._bind_gpu:
            return self._execute_gpu(inputs)
        if self._bf16_inputs or self._bf16_outputs:
            return self._execute_bound(inputs)
        feed = {
            name: _to_ort_strings(name, value) if name in self._string_inputs else value
            for name, value in inputs.items()
        }
        results = self._session.run(self._output_names, feed, self._run_options)
        outputs: dict[str, Array] = {}
        for name, value in zip(self._output_names, results, strict=True):
            array = np.asarray(value)
            if name in self._string_outputs:
                array = _from_ort_strings(array)
            outputs[name] = array
        return outputs

    def _execute_gpu(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """IO binding on a GPU: one host-to-device copy per input, outputs allocated on the
        device and copied to host memory once."""
        binding = self._session.io_binding()
        for name, value in inputs.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            binding.bind_output(name, "cuda", self._device)
        self._session.run_with_iobinding(binding, self._run_options)
        results = binding.copy_outputs_to_cpu()
        return {name: np.asarray(value)
                for name, value in zip(self._output_names, results, strict=True)}

    def _execute_bound(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        """The IO-binding path, for models with BF16 tensors that numpy cannot name."""
        binding = self._session.io_binding()
        for name, value in inputs.items():
            if name in self._bf16_inputs:
                words = np.ascontiguousarray(value, dtype=np.uint16)
                binding.bind_ortvalue_input(
                    name, ort.OrtValue.ortvalue_from_numpy_with_onnx_type(words, _ONNX_BFLOAT16)
                )
            elif name in self._string_inputs:
                binding.bind_cpu_input(name, _to_ort_strings(name, value))
            else:
                binding.bind_cpu_input(name, np.ascontiguousarray(value))
        for name in self._output_names:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding, self._run_options)
        outputs: dict[str, Array] = {}
        for name, value in zip(self._output_names, binding.get_outputs(), strict=True):
            if name in self._bf16_outputs:
                shape = tuple(value.shape())
                raw = ctypes.string_at(value.data_ptr(), math.prod(shape) * 2)
                outputs[name] = np.frombuffer(raw, dtype="<u2").reshape(shape)
            elif name in self._string_outputs:
                outputs[name] = _from_ort_strings(np.asarray(value.numpy()))
            else:
                outputs[name] = np.asarray(value.numpy())
        return outputs

    def close(self) -> None:
        # Every reference to the session goes (the bound run, a fixed binding), so that its
        # memory (weights, arena) is freed now, not when the instance object is.
        self._plain_run = None
        self._fixed = None
        del self._session


def _to_ort_strings(name: str, value: Array) -> Array:
    """onnxruntime's Python API takes string tensors as str objects: decode the wire bytes."""
    flat = value.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        try:
            out[i] = item.decode("utf-8") if isinstance(item, bytes) else str(item)
        except UnicodeDecodeError:
            raise InvalidInput(
                f"input '{name}' element {i} is not valid UTF-8; onnxruntime string tensors "
                "hold text"
            ) from None
    return out.reshape(value.shape)


def _from_ort_strings(value: Array) -> Array:
    flat = value.reshape(-1)
    out = np.empty(flat.shape, dtype=object)
    for i, item in enumerate(flat):
        out[i] = item.encode("utf-8") if isinstance(item, str) else bytes(item)
    return out.reshape(value.shape)


class OnnxRuntimeFactory:
    """Loads ONNX Runtime instances and auto-completes specs from the model file."""

    parameter_keys = PARAMETER_KEYS

    def model_path(self, spec: ModelSpec, version_dir: str) -> str:
        path = confined(Path(version_dir), spec.default_model_filename or "model.onnx",
                        "default_model_filename", "the version directory")
        if not path.is_file():
            raise ModelLoadError(f"model file '{path}' is missing")
        return str(path)

    def _session(
        self, spec: ModelSpec, version_dir: str, instance_index: int
    ) -> tuple[ort.InferenceSession, int | None]:
        path = self.model_path(spec, version_dir)
        if TRT_CUDA_GRAPHS.value(spec.parameters, spec.name):
            # One graph replayed over fixed buffers, wherever the session ends up running.
            require_fixed_shapes(spec)
        providers = choose_providers(spec, instance_index, Path(version_dir).parent)
        try:
            session = ort.InferenceSession(
                path,
                sess_options=session_options(spec),
                providers=providers,
            )
        except ModelLoadError:
            raise
        except Exception as exc:  # onnxruntime raises several unrelated types for bad files
            raise ModelLoadError(f"onnxruntime could not load '{path}': {exc}") from exc
        # onnxruntime drops a provider it cannot initialise (no device, missing CUDA or
        # TensorRT libraries) with a warning only: a KIND_GPU instance that ends up elsewhere
        # is a load error here, never a silent fallback (KIND_AUTO, or allow_cpu_fallback,
        # accept it with a warning).
        wanted = _provider_name(providers[0])
        running = session.get_providers()
        if wanted != "CPUExecutionProvider" and wanted not in running:
            group, _ = instance_group(spec, instance_index)
            if group.kind != "AUTO" and not ALLOW_CPU_FALLBACK.value(spec.parameters, spec.name):
                raise ModelLoadError(
                    f"model '{spec.name}': onnxruntime could not start {wanted} (no CUDA "
                    f"device, or its libraries are missing?); the session would run on {running}"
                )
            log.warning("onnxruntime could not start the GPU provider; running on what started",
                        extra={"model": spec.name, "wanted": wanted, "running": running})
        on_gpu = bool({"CUDAExecutionProvider", "TensorrtExecutionProvider"} & set(running))
        return session, _device_of(providers) if on_gpu else None

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        path = self.model_path(spec, version_dir)
        try:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            raise ModelLoadError(f"onnxruntime could not load '{path}': {exc}") from exc
        inputs = _complete(spec, "input", spec.inputs, session.get_inputs())
        outputs = _complete(spec, "output", spec.outputs, session.get_outputs())
        return dataclasses.replace(spec, inputs=inputs, outputs=outputs)

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> OnnxRuntimeInstance:
        session, device = self._session(spec, version_dir, instance_index)
        return OnnxRuntimeInstance(session, spec, device)


def _complete(
    spec: ModelSpec, kind: str, declared: tuple[TensorSpec, ...], actual: list[Any]
) -> tuple[TensorSpec, ...]:
    """Check declared tensors against the model and fill in those the config omits."""
    by_name = {node.name: node for node in actual}
    for tensor in declared:
        node = by_name.get(tensor.name)
        if node is None:
            raise ModelLoadError(
                f"config {kind} '{tensor.name}' is not in the model; the model's {kind}s are "
                f"{sorted(by_name)}"
            )
        model_type = _ORT_TYPES.get(node.type)
        if model_type is not tensor.datatype:
            raise ModelLoadError(
                f"config {kind} '{tensor.name}' is {tensor.datatype.config_name} but the "
                f"model's is {node.type}"
            )
        check_dims(spec, kind, tensor, node.shape, "the model")
    if declared:
        if kind == "input":
            missing = set(by_name) - {t.name for t in declared}
            if missing:
                raise ModelLoadError(f"model inputs {sorted(missing)} are missing from the config")
        return declared
    completed = []
    for node in actual:
        datatype = _ORT_TYPES.get(node.type)
        if datatype is None:
            raise ModelLoadError(f"model {kind} '{node.name}' has unsupported type {node.type}")
        dims = tuple(d if isinstance(d, int) and d >= 0 else -1 for d in node.shape)
        if spec.batches:
            dims = dims[1:]
        completed.append(TensorSpec(name=node.name, datatype=datatype, dims=dims))
    return tuple(completed)
