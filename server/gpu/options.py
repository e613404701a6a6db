"""config.pbtxt ``parameters`` of GPU execution, parsed and checked without a GPU.

Native TensorRT backend (``platform: "tensorrt_plan"`` / ``backend: "tensorrt"``)::

    trt_build_from_onnx            "true": build the engine from <version>/model.onnx (cached)
    trt_precision                  fp32 (default) | fp16 | bf16 | int8, or a set: "int8,fp16"
    trt_workspace_mb               builder workspace limit, MiB
    trt_builder_optimization_level 0..5 (TensorRT's default when unset)
    trt_cuda_graphs                "true": capture one CUDA graph per batch shape on first use
    trt_engine_cache_dir           where built engines are cached (default: see engine_cache)
    trt_timing_cache               timing-cache file (default: one per GPU in the cache dir)
    trt_shape_<input>              ranges of the input's -1 dims (batch dim excluded):
                                   "MIN:OPT:MAX", each "AxBxC"; or one shape for all three

ONNX Runtime on a GPU (``instance_group { kind: KIND_GPU gpus: [...] }``)::

    execution_accelerator          cuda (default) | tensorrt (TensorRT execution provider)
    gpu_mem_limit                  CUDA arena limit in bytes
    cudnn_conv_algo_search         EXHAUSTIVE | HEURISTIC | DEFAULT
    arena_extend_strategy          kNextPowerOfTwo | kSameAsRequested
    trt_fp16, trt_int8             precision of the TensorRT provider (execution_accelerator
                                   tensorrt only), as are the keys below
    trt_engine_cache_path          enables the provider's engine cache in this directory
    trt_timing_cache_path          enables the provider's timing cache in this directory
    trt_workspace_mb, trt_builder_optimization_level, trt_cuda_graphs, trt_shape_<input>
                                   as for the native backend (profiles are passed explicitly)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from server.errors import ModelLoadError
from server.spec import InstanceSpec, ModelSpec

TRT_PREFIX = "trt_"
TRT_SHAPE_PREFIX = "trt_shape_"
PRECISIONS = ("fp32", "fp16", "bf16", "int8")
MAX_OPTIMIZATION_LEVEL = 5

#: ``trt_*`` keys of the native TensorRT backend (besides ``trt_shape_<input>``).
TRT_BACKEND_KEYS = frozenset({
    "trt_build_from_onnx",
    "trt_precision",
    "trt_workspace_mb",
    "trt_builder_optimization_level",
    "trt_cuda_graphs",
    "trt_engine_cache_dir",
    "trt_timing_cache",
})

#: ``trt_*`` keys of ONNX Runtime's TensorRT execution provider (besides ``trt_shape_*``).
ORT_TRT_KEYS = frozenset({
    "trt_fp16",
    "trt_int8",
    "trt_engine_cache_path",
    "trt_timing_cache_path",
    "trt_workspace_mb",
    "trt_builder_optimization_level",
    "trt_cuda_graphs",
})

ACCELERATORS = ("cuda", "tensorrt")
CONV_ALGO_SEARCH = ("EXHAUSTIVE", "HEURISTIC", "DEFAULT")
ARENA_STRATEGIES = ("kNextPowerOfTwo", "kSameAsRequested")

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


# -- scalar parameters -----------------------------------------------------------------------


def parse_bool(params: Mapping[str, str], key: str, default: bool, model: str) -> bool:
    raw = params.get(key)
    if raw is None or raw.strip() == "":
        return default
    lowered = raw.strip().lower()
    if lowered in _TRUE:
        return True
    if lowered in _FALSE:
        return False
    raise ModelLoadError(f"model '{model}' parameter '{key}' must be true or false, got '{raw}'")


def parse_int(
    params: Mapping[str, str], key: str, model: str, minimum: int = 0,
    maximum: int | None = None,
) -> int | None:
    raw = params.get(key)
    if raw is None or raw.strip() == "":
        return None
    try:
        value = int(raw.strip())
    except ValueError:
        raise ModelLoadError(
            f"model '{model}' parameter '{key}' must be an integer, got '{raw}'"
        ) from None
    if value < minimum or (maximum is not None and value > maximum):
        bound = f"{minimum}..{maximum}" if maximum is not None else f">= {minimum}"
        raise ModelLoadError(f"model '{model}' parameter '{key}' must be {bound}, got {value}")
    return value


def _choice(params: Mapping[str, str], key: str, choices: Sequence[str], model: str,
            case_sensitive: bool = False) -> str | None:
    raw = params.get(key)
    if raw is None or raw.strip() == "":
        return None
    value = raw.strip()
    for choice in choices:
        if value == choice or (not case_sensitive and value.lower() == choice.lower()):
            return choice
    raise ModelLoadError(
        f"model '{model}' parameter '{key}' must be one of {list(choices)}, got '{raw}'"
    )


# -- shapes ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ShapeRange:
    """min / opt / max of one tensor's shape (one optimisation profile entry)."""

    min: tuple[int, ...]
    opt: tuple[int, ...]
    max: tuple[int, ...]


def _dims_text(text: str, where: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace(",", "x").split("x")]
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        raise ModelLoadError(
            f"{where}: '{text}' is not a shape (dims separated by 'x', e.g. 3x224x224)"
        ) from None
    if not dims or any(d <= 0 for d in dims):
        raise ModelLoadError(f"{where}: shape '{text}' must have positive dims")
    return dims


def parse_shape_range(text: str, where: str) -> ShapeRange:
    """``"MIN:OPT:MAX"`` (each ``AxBxC``) or one shape for all three."""
    parts = text.strip().split(":")
    if len(parts) == 1:
        dims = _dims_text(parts[0], where)
        return ShapeRange(dims, dims, dims)
    if len(parts) != 3:
        raise ModelLoadError(f"{where}: '{text}' must be MIN:OPT:MAX or one shape")
    low, opt, high = (_dims_text(p, where) for p in parts)
    if not len(low) == len(opt) == len(high):
        raise ModelLoadError(f"{where}: MIN, OPT and MAX of '{text}' differ in rank")
    if any(not a <= b <= c for a, b, c in zip(low, opt, high, strict=True)):
        raise ModelLoadError(f"{where}: '{text}' needs MIN <= OPT <= MAX in every dim")
    return ShapeRange(low, opt, high)


def _shape_parameters(params: Mapping[str, str], model: str) -> Mapping[str, ShapeRange]:
    shapes = {}
    for key, value in params.items():
        if key.startswith(TRT_SHAPE_PREFIX):
            name = key[len(TRT_SHAPE_PREFIX):]
            if not name:
                raise ModelLoadError(f"model '{model}' parameter '{key}' names no input")
            shapes[name] = parse_shape_range(value, f"model '{model}' parameter '{key}'")
    return MappingProxyType(shapes)


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
            f"model '{spec.name}' parameter '{TRT_SHAPE_PREFIX}{unknown[0]}' names no input; "
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
                    f"with parameter '{TRT_SHAPE_PREFIX}{tensor.name}' (\"MIN:OPT:MAX\", each "
                    "dims without the batch dimension separated by 'x')"
                )
            given = ShapeRange(tensor.dims, tensor.dims, tensor.dims)
        elif len(given.min) != len(tensor.dims):
            raise ModelLoadError(
                f"{where}: '{TRT_SHAPE_PREFIX}{tensor.name}' has {len(given.min)} dims, the "
                f"input has {len(tensor.dims)} ({list(tensor.dims)}, batch dimension excluded)"
            )
        else:
            for i, d in enumerate(tensor.dims):
                if d > 0 and not given.min[i] == given.opt[i] == given.max[i] == d:
                    raise ModelLoadError(
                        f"{where}: dim {i} is fixed at {d} but '{TRT_SHAPE_PREFIX}"
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


def parse_precision(text: str, where: str) -> tuple[str, ...]:
    wanted = [p.strip().lower() for p in text.replace("+", ",").split(",") if p.strip()]
    if not wanted:
        raise ModelLoadError(f"{where} is empty; use one of {list(PRECISIONS)}")
    for p in wanted:
        if p not in PRECISIONS:
            raise ModelLoadError(f"{where}: '{p}' is not one of {list(PRECISIONS)}")
    if "fp32" in wanted and len(set(wanted)) > 1:
        raise ModelLoadError(f"{where}: fp32 means no reduced precision; do not combine it")
    return tuple(dict.fromkeys(wanted))


def parse_trt_options(params: Mapping[str, str], model: str) -> TrtOptions:
    """The native TensorRT backend's parameters; unknown ``trt_*`` keys are an error."""
    for key in params:
        if (key.startswith(TRT_PREFIX) and not key.startswith(TRT_SHAPE_PREFIX)
                and key not in TRT_BACKEND_KEYS):
            raise ModelLoadError(
                f"model '{model}' parameter '{key}' is not a TensorRT backend key; known: "
                f"{sorted(TRT_BACKEND_KEYS)} and {TRT_SHAPE_PREFIX}<input>"
            )
    raw_precision = params.get("trt_precision", "").strip()
    precision = (parse_precision(raw_precision, f"model '{model}' parameter 'trt_precision'")
                 if raw_precision else ("fp32",))
    cache_dir = params.get("trt_engine_cache_dir", "").strip() or None
    timing = params.get("trt_timing_cache", "").strip() or None
    return TrtOptions(
        build_from_onnx=parse_bool(params, "trt_build_from_onnx", False, model),
        precision=precision,
        workspace_mb=parse_int(params, "trt_workspace_mb", model, minimum=1),
        builder_optimization_level=parse_int(params, "trt_builder_optimization_level", model,
                                             maximum=MAX_OPTIMIZATION_LEVEL),
        cuda_graphs=parse_bool(params, "trt_cuda_graphs", False, model),
        engine_cache_dir=cache_dir,
        timing_cache=timing,
        shapes=_shape_parameters(params, model),
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


def parse_ort_gpu_options(params: Mapping[str, str], model: str) -> OrtGpuOptions:
    """ONNX Runtime's GPU parameters; ``trt_*`` keys need ``execution_accelerator tensorrt``."""
    accelerator = _choice(params, "execution_accelerator", ACCELERATORS, model) or "cuda"
    trt_keys = sorted(k for k in params if k.startswith(TRT_PREFIX))
    for key in trt_keys:
        if not key.startswith(TRT_SHAPE_PREFIX) and key not in ORT_TRT_KEYS:
            raise ModelLoadError(
                f"model '{model}' parameter '{key}' is not an ONNX Runtime TensorRT key; known: "
                f"{sorted(ORT_TRT_KEYS)} and {TRT_SHAPE_PREFIX}<input> (the native backend's "
                "keys need platform \"tensorrt_plan\")"
            )
    if trt_keys and accelerator != "tensorrt":
        raise ModelLoadError(
            f"model '{model}' parameter '{trt_keys[0]}' configures the TensorRT execution "
            "provider: set parameter execution_accelerator to \"tensorrt\""
        )
    return OrtGpuOptions(
        accelerator=accelerator,
        gpu_mem_limit=parse_int(params, "gpu_mem_limit", model, minimum=1),
        cudnn_conv_algo_search=_choice(params, "cudnn_conv_algo_search", CONV_ALGO_SEARCH,
                                       model),
        arena_extend_strategy=_choice(params, "arena_extend_strategy", ARENA_STRATEGIES, model,
                                      case_sensitive=False),
        trt_fp16=parse_bool(params, "trt_fp16", False, model),
        trt_int8=parse_bool(params, "trt_int8", False, model),
        trt_engine_cache_path=params.get("trt_engine_cache_path", "").strip() or None,
        trt_timing_cache_path=params.get("trt_timing_cache_path", "").strip() or None,
        trt_workspace_mb=parse_int(params, "trt_workspace_mb", model, minimum=1),
        trt_builder_optimization_level=parse_int(params, "trt_builder_optimization_level",
                                                 model, maximum=MAX_OPTIMIZATION_LEVEL),
        trt_cuda_graphs=parse_bool(params, "trt_cuda_graphs", False, model),
        shapes=_shape_parameters(params, model),
    )


Provider = str | tuple[str, dict[str, Any]]


def ort_gpu_providers(
    spec: ModelSpec, options: OrtGpuOptions, device: int, available: Sequence[str]
) -> list[Provider]:
    """Execution providers (with their options) of one GPU instance on ``device``.

    Raises ModelLoadError when the accelerator asked for is not in ``available``.
    """
    cuda: dict[str, Any] = {"device_id": device}
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
            trt["trt_engine_cache_path"] = options.trt_engine_cache_path
        if options.trt_timing_cache_path is not None:
            trt["trt_timing_cache_enable"] = True
            trt["trt_timing_cache_path"] = options.trt_timing_cache_path
        if options.trt_workspace_mb is not None:
            trt["trt_max_workspace_size"] = options.trt_workspace_mb << 20
        if options.trt_builder_optimization_level is not None:
            trt["trt_builder_optimization_level"] = options.trt_builder_optimization_level
        if options.trt_cuda_graphs:
            trt["trt_cuda_graph_enable"] = True
        profile = _explicit_profile(spec, options.shapes)
        if profile:
            for which in ("min", "opt", "max"):
                trt[f"trt_profile_{which}_shapes"] = profile_text(profile, which)
        providers.append(("TensorrtExecutionProvider", trt))
    providers.append(("CUDAExecutionProvider", cuda))
    providers.append("CPUExecutionProvider")
    return providers


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
