"""config.pbtxt -> ModelConfig protobuf -> validated ModelSpec.

The schema is our proto/model_config.proto, which keeps Triton's field names and numbers, so a
Triton config parses as is. Fields we do not support are absent from the schema: the parser
then rejects them with the file, line and field name.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np
from google.protobuf import text_format

from server import parameters as model_parameters
from server._pb import model_config_pb2 as mc
from server.accelerator_options import TRT_BUILD_FROM_ONNX
from server.accelerator_options import validate_parameters as validate_gpu_parameters
from server.errors import ModelLoadError
from server.parameters import Key, ModelCheck, number
from server.preprocess import options as preprocess_config
from server.repository import cards
from server.security.paths import check_relative
from server.spec import (
    BatchingSpec,
    InstanceSpec,
    ModelSpec,
    QueuePolicy,
    TensorSpec,
    WarmupInput,
    WarmupSpec,
)
from server.types import DataType

CONFIG_FILE = "config.pbtxt"
ONNX_PLATFORMS = frozenset({"onnxruntime_onnx"})
ONNX_BACKENDS = frozenset({"onnxruntime"})
#: platform -> the backend that runs it (Triton's pairs).
PLATFORM_BACKENDS = {"onnxruntime_onnx": "onnxruntime", "tensorrt_plan": "tensorrt",
                     "pytorch_libtorch": "pytorch"}
BACKEND_PLATFORMS = {backend: platform for platform, backend in PLATFORM_BACKENDS.items()}
#: Backends named without a platform (Triton's Python backend sets none).
PYTHON_BACKENDS = frozenset({"python", "mlflow_pyfunc"})
#: The file an MLflow model directory holds.
MLMODEL_FILE = "MLmodel"
_KINDS = {
    mc.ModelInstanceGroup.KIND_AUTO: "AUTO",
    mc.ModelInstanceGroup.KIND_CPU: "CPU",
    mc.ModelInstanceGroup.KIND_GPU: "GPU",
}


def read_config(model_dir: Path) -> mc.ModelConfig:
    """Parse ``model_dir/config.pbtxt``; a missing file gives an empty config to auto-complete."""
    path = model_dir / CONFIG_FILE
    config = mc.ModelConfig()
    if not path.exists():
        return config
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ModelLoadError(f"cannot read {path}: {exc}") from exc
    try:
        text_format.Parse(text, config)
    except text_format.ParseError as exc:
        raise ModelLoadError(f"{path}:{exc}") from None
    return config


def _datatype(value: int, where: str) -> DataType:
    name = mc.DataType.Name(value)
    if value == mc.TYPE_INVALID:
        raise ModelLoadError(f"{where}: data_type is missing")
    try:
        return DataType.from_config(name)
    except ValueError as exc:
        raise ModelLoadError(f"{where}: {exc}") from None


def _dims(values: Iterable[int], where: str) -> tuple[int, ...]:
    dims = tuple(int(d) for d in values)
    for d in dims:
        if d < -1 or d == 0:
            raise ModelLoadError(f"{where}: dims must be positive or -1, got {list(dims)}")
    return dims


def _queue_policy(policy: mc.ModelQueuePolicy, where: str) -> QueuePolicy:
    if policy.timeout_action == mc.ModelQueuePolicy.DELAY:
        raise ModelLoadError(f"{where}: timeout_action DELAY is not supported; use REJECT")
    return QueuePolicy(
        timeout_us=int(policy.default_timeout_microseconds),
        allow_timeout_override=policy.allow_timeout_override,
        max_queue_size=int(policy.max_queue_size),
    )


def _batching(config: mc.ModelConfig, name: str) -> BatchingSpec:
    if not config.HasField("dynamic_batching"):
        return BatchingSpec()
    db = config.dynamic_batching
    where = f"model '{name}' dynamic_batching"
    if config.max_batch_size <= 0:
        raise ModelLoadError(f"{where}: needs max_batch_size > 0")
    preferred = tuple(int(s) for s in db.preferred_batch_size)
    for size in preferred:
        if size <= 0 or size > config.max_batch_size:
            raise ModelLoadError(
                f"{where}: preferred_batch_size {size} is outside 1..{config.max_batch_size}"
            )
    levels = int(db.priority_levels)
    default_level = int(db.default_priority_level)
    if levels and not 1 <= default_level <= levels:
        raise ModelLoadError(
            f"{where}: default_priority_level must be within 1..{levels}, got {default_level}"
        )
    if not levels and default_level:
        raise ModelLoadError(f"{where}: default_priority_level needs priority_levels")
    per_level = {}
    for level, policy in db.priority_queue_policy.items():
        if not 1 <= level <= max(levels, 0):
            raise ModelLoadError(
                f"{where}: priority_queue_policy level {level} is outside 1..{levels}"
            )
        per_level[int(level)] = _queue_policy(policy, f"{where} priority {level}")
    return BatchingSpec(
        enabled=True,
        max_queue_delay_us=int(db.max_queue_delay_microseconds),
        preferred_batch_sizes=preferred,
        preserve_ordering=db.preserve_ordering,
        priority_levels=levels,
        default_priority_level=default_level,
        default_queue_policy=_queue_policy(db.default_queue_policy, where),
        priority_queue_policy=MappingProxyType(per_level),
    )


def _instances(config: mc.ModelConfig, name: str) -> tuple[InstanceSpec, ...]:
    groups = []
    for group in config.instance_group:
        kind = _KINDS.get(group.kind)
        if kind is None:
            raise ModelLoadError(
                f"model '{name}' instance_group kind "
                f"{mc.ModelInstanceGroup.Kind.Name(group.kind)} is not supported"
            )
        count = int(group.count) if group.count else 1
        if count < 0:
            raise ModelLoadError(f"model '{name}' instance_group count must be positive")
        groups.append(InstanceSpec(kind=kind, count=count, gpus=tuple(int(g) for g in group.gpus)))
    return tuple(groups) or (InstanceSpec(kind="AUTO", count=1),)


def _warmup(config: mc.ModelConfig, name: str) -> tuple[WarmupSpec, ...]:
    specs = []
    for warm in config.model_warmup:
        where = f"model '{name}' model_warmup '{warm.name}'"
        inputs = {}
        for input_name, data in warm.inputs.items():
            source = data.WhichOneof("input_data_type")
            if source is None:
                raise ModelLoadError(f"{where} input '{input_name}': no data source given")
            data_file = "" if source != "input_data_file" else check_relative(
                data.input_data_file, f"{where} input '{input_name}' input_data_file")
            inputs[input_name] = WarmupInput(
                datatype=_datatype(data.data_type, f"{where} input '{input_name}'"),
                dims=_dims(data.dims, f"{where} input '{input_name}'"),
                source={"zero_data": "zero", "random_data": "random"}.get(source, "file"),
                data_file=data_file,
            )
        batch = int(warm.batch_size) or 1
        if config.max_batch_size and batch > config.max_batch_size:
            raise ModelLoadError(f"{where}: batch_size {batch} exceeds max_batch_size")
        specs.append(
            WarmupSpec(
                name=warm.name, batch_size=batch, count=int(warm.count) or 1,
                inputs=MappingProxyType(inputs),
            )
        )
    return tuple(specs)


def to_spec(config: mc.ModelConfig, model_dir: Path) -> ModelSpec:
    """Validate a parsed config against what this server supports."""
    name = config.name or model_dir.name
    if name != model_dir.name:
        raise ModelLoadError(
            f"{model_dir / CONFIG_FILE}: name '{config.name}' does not match the model's "
            f"directory '{model_dir.name}'"
        )
    platform = config.platform
    backend = config.backend
    if platform and platform not in PLATFORM_BACKENDS:
        raise ModelLoadError(f"model '{name}': platform '{platform}' is not supported; "
                             f"supported: {sorted(PLATFORM_BACKENDS)}")
    if backend and backend not in BACKEND_PLATFORMS and backend not in PYTHON_BACKENDS:
        raise ModelLoadError(f"model '{name}': backend '{backend}' is not supported; "
                             f"supported: {sorted({*BACKEND_PLATFORMS, *PYTHON_BACKENDS})}")
    if platform and backend and PLATFORM_BACKENDS[platform] != backend:
        raise ModelLoadError(f"model '{name}': platform '{platform}' is run by backend "
                             f"'{PLATFORM_BACKENDS[platform]}', not '{backend}'")
    backend = backend or PLATFORM_BACKENDS.get(platform) or _detect_backend(model_dir)
    platform = platform or BACKEND_PLATFORMS.get(backend, "")
    if config.max_batch_size < 0:
        raise ModelLoadError(f"model '{name}': max_batch_size must not be negative")
    if config.batch_input:
        raise ModelLoadError(f"model '{name}': batch_input is not supported (ragged inputs are "
                             "padded into a dense batch instead)")
    if config.model_transaction_policy.decoupled:
        raise ModelLoadError(f"model '{name}': decoupled models (model_transaction_policy "
                             "decoupled: responses sent through a response sender) are not "
                             "supported")
    parameters = {key: value.string_value for key, value in config.parameters.items()}
    inputs = []
    for tensor in config.input:
        where = f"model '{name}' input '{tensor.name}'"
        if tensor.HasField("reshape") or tensor.is_shape_tensor:
            raise ModelLoadError(f"{where}: reshape and shape tensors are not supported")
        datatype = _datatype(tensor.data_type, where)
        dims = _dims(tensor.dims, where)
        pad = 0.0
        if tensor.allow_ragged_batch:
            pad = _ragged_input(config, datatype, dims, parameters, tensor.name, name, where)
        inputs.append(TensorSpec(tensor.name, datatype, dims, optional=tensor.optional,
                                 ragged=tensor.allow_ragged_batch, pad_value=pad))
    ragged = sorted(t.name for t in inputs if t.ragged)
    for padded in RAGGED_PAD.values(parameters, name):
        if padded not in ragged:
            raise ModelLoadError(f"model '{name}' parameter '{RAGGED_PAD.name}{padded}' names no "
                                 f"input with allow_ragged_batch; those are {ragged}")
    scatter = _scatter_outputs(config, inputs, name)
    outputs = []
    for tensor in config.output:
        where = f"model '{name}' output '{tensor.name}'"
        if tensor.HasField("reshape") or tensor.is_shape_tensor:
            raise ModelLoadError(f"{where}: reshape and shape tensors are not supported")
        labels = "" if not tensor.label_filename else check_relative(
            tensor.label_filename, f"{where} label_filename")
        outputs.append(TensorSpec(tensor.name, _datatype(tensor.data_type, where),
                                  _dims(tensor.dims, where),
                                  scatter_like=scatter.pop(tensor.name, ""),
                                  label_filename=labels))
    if scatter:
        raise ModelLoadError(f"model '{name}': batch_output names outputs the model does not "
                             f"declare: {sorted(scatter)}")
    for kind, tensors in (("input", inputs), ("output", outputs)):
        seen: set[str] = set()
        for t in tensors:
            if not t.name:
                raise ModelLoadError(f"model '{name}': an {kind} has no name")
            if t.name in seen:
                raise ModelLoadError(f"model '{name}': {kind} '{t.name}' is declared twice")
            seen.add(t.name)
    instances = _instances(config, name)
    validate_gpu_parameters(backend, parameters, name, instances)
    return ModelSpec(
        name=name,
        platform=platform,
        backend=backend,
        max_batch_size=int(config.max_batch_size),
        inputs=tuple(inputs),
        outputs=tuple(outputs),
        batching=_batching(config, name),
        instances=instances,
        parameters=MappingProxyType(parameters),
        warmup=_warmup(config, name),
        default_model_filename=check_relative(
            config.default_model_filename or _default_model_filename(backend, parameters, name),
            f"model '{name}' default_model_filename"),
        preprocess=preprocess_config.parse_preprocess(parameters, name),
        response_cache=config.response_cache.enable,
    )


RAGGED_PAD = Key("ragged_pad.", number(), "the value a ragged input is padded with", "0",
                 member="<input>")


def _ragged_input(config: mc.ModelConfig, datatype: DataType, dims: tuple[int, ...],
                  parameters: Mapping[str, str], input_name: str, model: str,
                  where: str) -> float:
    """Check that an ``allow_ragged_batch`` input can be padded; its pad value."""
    if config.max_batch_size <= 0:
        raise ModelLoadError(f"{where}: allow_ragged_batch needs a model that batches "
                             "(max_batch_size > 0)")
    if datatype is DataType.BYTES:
        raise ModelLoadError(f"{where}: ragged batching of BYTES inputs is not supported")
    if -1 not in dims:
        raise ModelLoadError(f"{where}: allow_ragged_batch needs a variable (-1) dim to pad")
    pad = RAGGED_PAD.value(parameters, model, input_name)
    dtype = datatype.numpy_dtype
    fits = (pad in (0.0, 1.0) if dtype.kind == "b"
            else pad.is_integer() and np.can_cast(np.min_scalar_type(int(pad)), dtype)
            if dtype.kind in "iu" else True)
    if not fits:
        raise ModelLoadError(f"{where}: pad value {pad:g} does not fit {datatype.wire}")
    return pad


def _scatter_outputs(config: mc.ModelConfig, inputs: list[TensorSpec],
                     name: str) -> dict[str, str]:
    """batch_output entries: output name -> the ragged input whose shape it takes."""
    ragged = {t.name for t in inputs if t.ragged}
    scatter: dict[str, str] = {}
    for entry in config.batch_output:
        where = f"model '{name}' batch_output"
        if entry.kind != mc.BatchOutput.BATCH_SCATTER_WITH_INPUT_SHAPE:
            raise ModelLoadError(f"{where}: only BATCH_SCATTER_WITH_INPUT_SHAPE is supported")
        if len(entry.source_input) != 1 or entry.source_input[0] not in ragged:
            raise ModelLoadError(f"{where}: source_input must name one input with "
                                 f"allow_ragged_batch, got {list(entry.source_input)}")
        for target in entry.target_name:
            scatter[target] = entry.source_input[0]
    return scatter


def _default_model_filename(backend: str, parameters: dict[str, str], model: str) -> str:
    """model.onnx; for TensorRT model.plan unless the engine is built from model.onnx; for
    PyTorch model.pt (Triton's; a torch.export program, model.pt2, is named explicitly); for
    Python model.py; for an MLflow pyfunc model its MLmodel file."""
    if backend == "tensorrt" and not TRT_BUILD_FROM_ONNX.value(parameters, model):
        return "model.plan"
    return {"pytorch": "model.pt", "python": "model.py",
            "mlflow_pyfunc": MLMODEL_FILE}.get(backend, "model.onnx")


def _detect_backend(model_dir: Path) -> str:
    """The backend of a config that names none: ``mlflow_pyfunc`` when the newest version
    directory holding a model holds an MLflow model (an MLmodel file) and no model.onnx (an
    MLflow model of the ONNX flavour is served as ONNX), else ``onnxruntime``."""
    try:
        versions = sorted((p for p in model_dir.iterdir() if p.name.isdigit() and p.is_dir()),
                          key=lambda p: int(p.name), reverse=True)
    except OSError:
        return "onnxruntime"
    for version in versions:
        if (version / "model.onnx").is_file():
            return "onnxruntime"
        if (version / MLMODEL_FILE).is_file():
            return "mlflow_pyfunc"
    return "onnxruntime"


#: The keys any model may have, whatever its backend, as their owners declare them.
#: The keys the repository itself reads (ragged padding, image preprocessing, model cards).
REPOSITORY_KEYS: tuple[Key[object], ...] = (
    RAGGED_PAD,
    *preprocess_config.PARAMETER_KEYS,
    *cards.PARAMETER_KEYS,
)


def check_parameters(
    spec: ModelSpec, keys: Sequence[Key[object]], checks: Sequence[ModelCheck] = ()
) -> None:
    """Check the model's ``parameters`` once its backend is known: every key must be the
    repository's or one of ``keys`` (what the composed components and the backend declare),
    with a value its parser takes, and every whole-model ``check`` must pass (drift's settings
    agree with each other). Raises ModelLoadError naming the key, and for an unknown key the
    keys there are."""
    model_parameters.check(spec.parameters, (*REPOSITORY_KEYS, *keys), spec.name)
    for check in checks:
        check(spec.parameters, spec.name)


#: Triton's --backend-config default-max-batch-size, used when a model comes without a config.
AUTO_MAX_BATCH_SIZE = 4


def with_default_batching(spec: ModelSpec) -> ModelSpec:
    """A model without config.pbtxt batches when every tensor's first dimension is dynamic,
    as Triton's auto-complete does: max_batch_size 4 with dynamic batching on."""
    tensors = (*spec.inputs, *spec.outputs)
    if spec.max_batch_size or any(not t.dims or t.dims[0] != -1 for t in tensors):
        return spec
    return dataclasses.replace(
        spec,
        max_batch_size=AUTO_MAX_BATCH_SIZE,
        inputs=tuple(dataclasses.replace(t, dims=t.dims[1:]) for t in spec.inputs),
        outputs=tuple(dataclasses.replace(t, dims=t.dims[1:]) for t in spec.outputs),
        batching=BatchingSpec(enabled=True),
    )


def completed_config(config: mc.ModelConfig, spec: ModelSpec) -> mc.ModelConfig:
    """The config as served by the ModelConfig RPC: auto-completed fields filled in."""
    served = mc.ModelConfig()
    served.CopyFrom(config)
    served.max_batch_size = spec.max_batch_size
    if spec.batching.enabled and not served.HasField("dynamic_batching"):
        served.dynamic_batching.SetInParent()
    served.name = spec.name
    served.platform = spec.platform
    served.backend = spec.backend
    served.default_model_filename = spec.default_model_filename
    if not served.input:
        for t in spec.inputs:
            served.input.add(name=t.name, data_type=mc.DataType.Value(t.datatype.config_name),
                             dims=list(t.dims))
    if not served.output:
        for t in spec.outputs:
            served.output.add(name=t.name, data_type=mc.DataType.Value(t.datatype.config_name),
                              dims=list(t.dims))
    if not served.instance_group:
        for group in spec.instances:
            served.instance_group.add(
                count=group.count,
                kind=mc.ModelInstanceGroup.Kind.Value("KIND_" + group.kind),
                gpus=list(group.gpus),
            )
    return served
