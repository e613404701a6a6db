"""config.pbtxt ``parameters`` of GPU execution, parsed and checked without a GPU.

The keys are declared below (server/parameters.py Key): :data:`TRT_KEYS` for the native
TensorRT backend (``platform: "tensorrt_plan"``), :data:`ORT_GPU_KEYS` for ONNX Runtime on a
GPU (``instance_group { kind: KIND_GPU }``), whose ``trt_*`` keys configure its TensorRT
execution provider and need ``execution_accelerator: "tensorrt"``. ``trt_workspace_mb``,
``trt_builder_optimization_level``, ``trt_cuda_graphs`` and ``trt_shape_<input>`` mean the
same on both; ``trt_shape_<input>`` gives the range of an input's -1 dims (batch dim
excluded) as ``"MIN:OPT:MAX"``, each ``AxBxC``, or one shape for all three.

The precision contract: "fp32" means IEEE FP32 arithmetic, never TF32 (whose 10-bit mantissa
NVIDIA libraries use for FP32 matrix products and convolutions by default on Ampere and
later). So an fp32 native TensorRT engine is built with TensorRT's TF32 builder flag cleared
(server/backends/tensorrt/builder.py), ONNX Runtime's CUDA provider gets ``use_tf32: 0``
(its cuBLAS GEMMs and cuDNN convolutions; onnxruntime-gpu 1.18 and later), and the PyTorch
backend turns TF32 off in cuBLAS and cuDNN. Such outputs agree with the CPU within
:data:`FP32_ATOL`. Two paths keep TF32 and are documented as such: reduced-precision engines
(fp16, bf16, int8: their layers left in FP32 may use TF32; the reduced precision bounds the
error anyway) and ONNX Runtime's TensorRT provider, which has no per-session switch (only
``NVIDIA_TF32_OVERRIDE=0`` in the server's environment, for the whole process): its FP32
outputs agree within :data:`TF32_ATOL`.

Pure (no GPU, TensorRT or cuda-python needed) and outside server/backends on purpose: the
repository checks these parameters when it reads config.pbtxt, and ``peregrine trt build``
reads them, and neither may import a concrete backend (tests/test_code_quality.py). Both
backends import them from here: server/backends/onnxruntime.py for its CUDA and TensorRT
providers, server/backends/tensorrt/ for the native TensorRT backend.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.errors import ModelLoadError
from server.parameters import Key, boolean, choice, integer, optional
from server.security.paths import confined, relative_path
from server.spec import InstanceSpec, ModelSpec

PRECISIONS = ("fp32", "fp16", "bf16", "int8")
#: Largest absolute difference from the CPU expected of an FP32 (no TF32) GPU output on
#: probabilities in 0..1 (different kernels sum in another order).
FP32_ATOL = 1e-4
#: The same where TF32 may be used: inputs of products rounded to 10 mantissa bits (a
#: simulation of that rounding on the example CNN gave errors up to 3.2e-4).
TF32_ATOL = 1e-3
MAX_OPTIMIZATION_LEVEL = 5
ACCELERATORS = ("cuda", "tensorrt")
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")


# -- shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShapeRange:
    """min / opt / max of one tensor's shape (one optimisation profile entry)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


_SHAPE = "MIN:OPT:MAX (each dims separated by 'x', e.g. 1x16:8x128:8x512) or one shape"


def _dims_text(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(p.strip()) for p in text.replace(",", "x").split("x"))
    except ValueError:
        raise ValueError(_SHAPE) from None
    if any(d <= 0 for d in dims):
        raise ValueError(_SHAPE + " with positive dims")
    return dims


def parse_shape_range(text: str) -> ShapeRange:
    """``"MIN:OPT:MAX"`` (each ``AxBxC``) or one shape for all three."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        dims = _dims_text(parts[0])
        return ShapeRange(dims, dims, dims)
    if len(parts) != 3:
        raise ValueError(_SHAPE)
    low, opt, high = (_dims_text(p) for p in parts)
    if not len(low) == len(opt) == len(high):
        raise ValueError(_SHAPE + " with MIN, OPT and MAX of one rank")
    if any(not a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ValueError(_SHAPE + " with MIN <= OPT <= MAX in every dim")
    return ShapeRange(low, opt, high)


def optimisation_profile(
    spec: ModelSpec, shapes: Mapping[str, ShapeRange]
) -> dict[str, ShapeRange]:
    """Full input shapes (batch dimension included when the model batches) of the one
    optimisation profile an engine is built with.

    The batch dimension runs from 1 to max_batch_size, optimised for the largest preferred
    batch size (max_batch_size when none is preferred). A fixed dim is itself; a -1 dim takes
    its range from the input's ``trt_shape_<input>`` parameter, which is required then.
    """
    unknown = sorted(set(shapes) - {t.name for t in spec.inputs})
    if unknown and spec.inputs:
        raise ModelLoadError(
            f"model '{spec.name}' parameter '{TRT_SHAPE.name}{unknown[0]}' names no input; "
            f"the inputs are {[t.name for t in spec.inputs]}"
        )
    profile: dict[str, ShapeRange] = {}
    for tensor in spec.inputs:
        where = f"model '{spec.name}' input '{tensor.name}'"
        given = shapes.get(tensor.name)
        if given is None:
            if any(d < 0 for d in tensor.dims):
                raise ModelLoadError(
                    f"{where} has dims {list(tensor.dims)}: give the range of its -1 dims "
                    f"with parameter '{TRT_SHAPE.name}{tensor.name}' (\"MIN:OPT:MAX\", each "
                    "dims without the batch dimension separated by 'x')"
                )
            given = ShapeRange(tensor.dims, tensor.dims, tensor.dims)
        elif len(given.min) != len(tensor.dims):
            raise ModelLoadError(
                f"{where}: '{TRT_SHAPE.name}{tensor.name}' has {len(given.min)} dims, the "
                f"input has {len(tensor.dims)} ({list(tensor.dims)}, batch dimension excluded)"
            )
        else:
            for i, d in enumerate(tensor.dims):
                if d > 0 and not given.min[i] == given.opt[i] == given.max[i] == d:
                    raise ModelLoadError(
                        f"{where}: dim {i} is fixed at {d} but '{TRT_SHAPE.name}"
                        f"{tensor.name}' gives it {given.min[i]}:{given.opt[i]}:{given.max[i]}"
                    )
        if spec.batches:
            top = spec.max_batch_size
            opt = max(spec.batching.preferred_batch_sizes, default=top)
            given = ShapeRange((1, *given.min), (opt, *given.opt), (top, *given.max))
        profile[tensor.name] = given
    return profile


def profile_text(profile: Mapping[str, ShapeRange], which: str) -> str:
    """ONNX Runtime's ``trt_profile_*_shapes`` form: ``name:1x3x32x32,other:1x8``."""
    return ",".join(
        f"{name}:" + "x".join(str(d) for d in getattr(shape, which))
        for name, shape in profile.items()
    )


# -- native TensorRT backend -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class TrtOptions:
    build_from_onnx: bool = False
    #: The precisions the builder may use; ("fp32",) sets no flag.
    precision: tuple[str, ...] = ("fp32",)
    workspace_mb: int | None = None
    builder_optimization_level: int | None = None
    cuda_graphs: bool = False
    engine_cache_dir: str | None = None
    timing_cache: str | None = None
    #: ``trt_shape_<input>``: ranges of the non-batch dims per input.
    shapes: Mapping[str, ShapeRange] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def precision_flags(self) -> tuple[str, ...]:
        """Builder flags to set (sorted): fp16, bf16, int8; none for plain fp32."""
        return tuple(sorted(p for p in self.precision if p != "fp32"))

    @property
    def precision_name(self) -> str:
        return "+".join(self.precision_flags) or "fp32"


def parse_precision(text: str) -> tuple[str, ...]:
    """``fp16``, or a set such as ``int8,fp16``; ``fp32`` (alone) sets no flag."""
    expected = f"one of {list(PRECISIONS)} or a comma-separated set of them (fp32 alone)"
    wanted = [p.strip().lower() for p in text.replace("+", ",").split(",") if p.strip()]
    if not wanted or any(p not in PRECISIONS for p in wanted):
        raise ValueError(expected)
    if "fp32" in wanted and len(set(wanted)) > 1:
        raise ValueError(expected + "; fp32 means no reduced precision, do not combine it")
    return tuple(dict.fromkeys(wanted))


# Keys of both TensorRT paths (the native backend and ONNX Runtime's TensorRT provider).
TRT_WORKSPACE_MB = Key("trt_workspace_mb", optional(integer(1)), "builder workspace limit, MiB")
TRT_OPTIMIZATION_LEVEL = Key(
    "trt_builder_optimization_level", optional(integer(0, MAX_OPTIMIZATION_LEVEL)),
    "TensorRT builder optimisation level (TensorRT's default when unset)")
TRT_CUDA_GRAPHS = Key("trt_cuda_graphs", boolean,
                      "capture one CUDA graph per batch shape on first use", "false")
TRT_SHAPE = Key("trt_shape_", parse_shape_range,
                "ranges of the input's -1 dims, batch dim excluded: MIN:OPT:MAX or one shape",
                member="<input>")

TRT_BUILD_FROM_ONNX = Key("trt_build_from_onnx", boolean,
                          "build the engine from <version>/model.onnx (cached)", "false")
TRT_PRECISION = Key("trt_precision", parse_precision,
                    "precisions the builder may use: fp32, fp16, bf16, int8 or a set", "fp32")
TRT_ENGINE_CACHE_DIR = Key("trt_engine_cache_dir", optional(relative_path),
                           "where built engines are cached, relative to the model directory "
                           "(default: see engine_cache)")
TRT_TIMING_CACHE = Key("trt_timing_cache", optional(relative_path),
                       "timing-cache file, relative to the model directory (default: one per "
                       "GPU in the engine cache dir)")
#: The native TensorRT backend's keys.
TRT_KEYS = (TRT_BUILD_FROM_ONNX, TRT_PRECISION, TRT_WORKSPACE_MB, TRT_OPTIMIZATION_LEVEL,
            TRT_CUDA_GRAPHS, TRT_ENGINE_CACHE_DIR, TRT_TIMING_CACHE, TRT_SHAPE)


def parse_trt_options(params: Mapping[str, str], model: str) -> TrtOptions:
    """The native TensorRT backend's parameters."""
    return TrtOptions(
        build_from_onnx=TRT_BUILD_FROM_ONNX.value(params, model),
        precision=TRT_PRECISION.value(params, model),
        workspace_mb=TRT_WORKSPACE_MB.value(params, model),
        builder_optimization_level=TRT_OPTIMIZATION_LEVEL.value(params, model),
        cuda_graphs=TRT_CUDA_GRAPHS.value(params, model),
        engine_cache_dir=TRT_ENGINE_CACHE_DIR.value(params, model),
        timing_cache=TRT_TIMING_CACHE.value(params, model),
        shapes=MappingProxyType(TRT_SHAPE.values(params, model)),
    )


# -- ONNX Runtime on a GPU -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OrtGpuOptions:
    accelerator: str = "cuda"
    gpu_mem_limit: int | None = None
    cudnn_conv_algo_search: str | None = None
    arena_extend_strategy: str | None = None
    trt_fp16: bool = False
    trt_int8: bool = False
    trt_engine_cache_path: str | None = None
    trt_timing_cache_path: str | None = None
    trt_workspace_mb: int | None = None
    trt_builder_optimization_level: int | None = None
    trt_cuda_graphs: bool = False
    shapes: Mapping[str, ShapeRange] = field(default_factory=lambda: MappingProxyType({}))


EXECUTION_ACCELERATOR = Key("execution_accelerator", choice(*ACCELERATORS),
                            "GPU execution provider: cuda, or tensorrt (TensorRT provider)",
                            "cuda")
GPU_MEM_LIMIT = Key("gpu_mem_limit", optional(integer(1)), "CUDA arena limit in bytes")
CUDNN_CONV_ALGO_SEARCH = Key("cudnn_conv_algo_search", optional(choice(*CONV_ALGO_SEARCH)),
                             "cuDNN convolution algorithm search (onnxruntime's default)")
ARENA_EXTEND_STRATEGY = Key("arena_extend_strategy", optional(choice(*ARENA_STRATEGIES)),
                            "how the CUDA arena grows (onnxruntime's default)")
TRT_FP16 = Key("trt_fp16", boolean, "TensorRT provider: allow fp16", "false")
TRT_INT8 = Key("trt_int8", boolean, "TensorRT provider: allow int8", "false")
TRT_ENGINE_CACHE_PATH = Key("trt_engine_cache_path", optional(relative_path),
                            "TensorRT provider: cache engines in this directory (relative to "
                            "the model directory)")
TRT_TIMING_CACHE_PATH = Key("trt_timing_cache_path", optional(relative_path),
                            "TensorRT provider: keep a timing cache in this directory "
                            "(relative to the model directory)")
#: Keys of ONNX Runtime's TensorRT execution provider (need execution_accelerator tensorrt).
ORT_TRT_KEYS = (TRT_FP16, TRT_INT8, TRT_ENGINE_CACHE_PATH, TRT_TIMING_CACHE_PATH,
                TRT_WORKSPACE_MB, TRT_OPTIMIZATION_LEVEL, TRT_CUDA_GRAPHS, TRT_SHAPE)
#: ONNX Runtime's GPU keys.
ORT_GPU_KEYS = (EXECUTION_ACCELERATOR, GPU_MEM_LIMIT, CUDNN_CONV_ALGO_SEARCH,
                ARENA_EXTEND_STRATEGY, *ORT_TRT_KEYS)


def parse_ort_gpu_options(params: Mapping[str, str], model: str) -> OrtGpuOptions:
    """ONNX Runtime's GPU parameters; TensorRT provider keys need ``execution_accelerator
    tensorrt``."""
    accelerator = EXECUTION_ACCELERATOR.value(params, model)
    trt_keys = sorted(k for k in params if any(d.owns(k) for d in ORT_TRT_KEYS))
    if trt_keys and accelerator != "tensorrt":
        raise ModelLoadError(
            f"model '{model}' parameter '{trt_keys[0]}' configures the TensorRT execution "
            "provider: set parameter execution_accelerator to \"tensorrt\""
        )
    return OrtGpuOptions(
        accelerator=accelerator,
        gpu_mem_limit=GPU_MEM_LIMIT.value(params, model),
        cudnn_conv_algo_search=CUDNN_CONV_ALGO_SEARCH.value(params, model),
        arena_extend_strategy=ARENA_EXTEND_STRATEGY.value(params, model),
        trt_fp16=TRT_FP16.value(params, model),
        trt_int8=TRT_INT8.value(params, model),
        trt_engine_cache_path=TRT_ENGINE_CACHE_PATH.value(params, model),
        trt_timing_cache_path=TRT_TIMING_CACHE_PATH.value(params, model),
        trt_workspace_mb=TRT_WORKSPACE_MB.value(params, model),
        trt_builder_optimization_level=TRT_OPTIMIZATION_LEVEL.value(params, model),
        trt_cuda_graphs=TRT_CUDA_GRAPHS.value(params, model),
        shapes=MappingProxyType(TRT_SHAPE.values(params, model)),
    )


Provider = str | tuple[str, dict[str, Any]]


def ort_gpu_providers(
    spec: ModelSpec, options: OrtGpuOptions, device: int, available: Sequence[str],
    model_dir: Path,
) -> list[Provider]:
    """Execution providers (with their options) of one GPU instance on ``device``; the cache
    paths are resolved inside ``model_dir``.

    Raises ModelLoadError when the accelerator asked for is not in ``available``, or a cache
    path leads out of the model directory.
    """
    # use_tf32 0: the precision contract (module docstring), an FP32 model computes in FP32.
    cuda: dict[str, Any] = {"device_id": device, "use_tf32": 0}
    if options.gpu_mem_limit is not None:
        cuda["gpu_mem_limit"] = options.gpu_mem_limit
    if options.cudnn_conv_algo_search is not None:
        cuda["cudnn_conv_algo_search"] = options.cudnn_conv_algo_search
    if options.arena_extend_strategy is not None:
        cuda["arena_extend_strategy"] = options.arena_extend_strategy
    providers: list[Provider] = []
    if options.accelerator == "tensorrt":
        if "TensorrtExecutionProvider" not in available:
            raise ModelLoadError(
                f"model '{spec.name}' asks for execution_accelerator tensorrt, but this "
                f"onnxruntime provides only {list(available)}; install onnxruntime-gpu with "
                "TensorRT libraries, or drop the parameter to run on CUDA"
            )
        trt: dict[str, Any] = {"device_id": device}
        if options.trt_fp16:
            trt["trt_fp16_enable"] = True
        if options.trt_int8:
            trt["trt_int8_enable"] = True
        if options.trt_engine_cache_path is not None:
            trt["trt_engine_cache_enable"] = True
            trt["trt_engine_cache_path"] = str(confined(
                model_dir, options.trt_engine_cache_path, "trt_engine_cache_path"))
        if options.trt_timing_cache_path is not None:
            trt["trt_timing_cache_enable"] = True
            trt["trt_timing_cache_path"] = str(confined(
                model_dir, options.trt_timing_cache_path, "trt_timing_cache_path"))
        if options.trt_workspace_mb is not None:
            trt["trt_max_workspace_size"] = options.trt_workspace_mb << 20
        if options.trt_builder_optimization_level is not None:
            trt["trt_builder_optimization_level"] = options.trt_builder_optimization_level
        if options.trt_cuda_graphs:  # shapes checked by the backend: require_fixed_shapes
            trt["trt_cuda_graph_enable"] = True
        profile = _explicit_profile(spec, options.shapes)
        if profile:
            for which in ("min", "opt", "max"):
                trt[f"trt_profile_{which}_shapes"] = profile_text(profile, which)
        providers.append(("TensorrtExecutionProvider", trt))
    providers.append(("CUDAExecutionProvider", cuda))
    providers.append("CPUExecutionProvider")
    return providers


def require_fixed_shapes(spec: ModelSpec) -> None:
    """``trt_cuda_graphs`` on ONNX Runtime's TensorRT provider captures one CUDA graph and
    replays it for every run: with other shapes it would give stale or wrong outputs. So it
    is refused unless every run has the same shapes: no batching (max_batch_size 0: requests
    of a batching model carry 1..max_batch_size rows) and no -1 dim, outputs included (their
    buffers are allocated once: server/backends/fixed_binding.py). (The native TensorRT
    backend captures one graph per batch shape and needs neither.)"""
    varying = [t.name for t in (*spec.inputs, *spec.outputs) if any(d < 0 for d in t.dims)]
    if spec.max_batch_size > 0 or varying:
        why = (f"max_batch_size is {spec.max_batch_size} (batches of 1..{spec.max_batch_size} "
               "rows)" if spec.max_batch_size > 0 else f"tensors {varying} have -1 dims")
        raise ModelLoadError(
            f"model '{spec.name}' parameter '{TRT_CUDA_GRAPHS.name}': ONNX Runtime's TensorRT "
            "provider replays one captured CUDA graph, so every run must have the same shapes, "
            f"but {why}; use max_batch_size 0 and fixed dims, or platform tensorrt_plan (one "
            "graph per batch shape), or leave CUDA graphs off"
        )


def _explicit_profile(spec: ModelSpec, shapes: Mapping[str, ShapeRange]) -> dict[str, ShapeRange]:
    """The profile for the TensorRT provider, or {} when it cannot be derived (the provider
    then builds engines for the shapes it meets, rebuilding when a larger one arrives)."""
    if not spec.inputs:
        return {}
    try:
        return optimisation_profile(spec, shapes)
    except ModelLoadError:
        if shapes:
            raise  # the config gave shapes and they are wrong: say so
        return {}


# -- instances -------------------------------------------------------------------------------


def instance_group(spec: ModelSpec, index: int) -> tuple[InstanceSpec, int]:
    """The instance_group of instance ``index`` (0-based over all groups) and its index within
    that group."""
    start = 0
    for group in spec.instances:
        if index < start + group.count:
            return group, index - start
        start += group.count
    return spec.instances[0], 0


def instance_device(spec: ModelSpec, index: int) -> int:
    """The GPU of instance ``index``: its group's ``gpus`` in turn, device 0 when none."""
    group, within = instance_group(spec, index)
    return group.gpus[within % len(group.gpus)] if group.gpus else 0


# -- validation at config load ---------------------------------------------------------------


def validate_parameters(
    backend: str, params: Mapping[str, str], model: str, instances: Sequence[InstanceSpec]
) -> None:
    """Checks that need no model file, run when config.pbtxt is read. Raises ModelLoadError."""
    if backend == "tensorrt":
        parse_trt_options(params, model)
        for group in instances:
            if group.kind == "CPU":
                raise ModelLoadError(
                    f"model '{model}': TensorRT runs on GPUs; instance_group kind KIND_CPU is "
                    "not possible (use KIND_GPU, or platform onnxruntime_onnx for the CPU)"
                )
    elif backend == "onnxruntime":
        parse_ort_gpu_options(params, model)
