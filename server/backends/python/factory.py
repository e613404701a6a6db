"""The factories app.py registers: ``python`` (a Triton ``model.py``) and ``mlflow_pyfunc``
(an MLflow model directory), both run by model processes (instance.py).

A ``python`` model declares its inputs and outputs in config.pbtxt, as Triton requires, unless
its TritonPythonModel defines ``auto_complete_config`` (run then in a process of its own at
load). Its other ``parameters`` are its own (read by model.py from ``args['model_config']``),
so the backend owns every key. An ``mlflow_pyfunc`` model's inputs and outputs come from its
signature, as an ONNX model's come from the model file.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import logging
import threading
from pathlib import Path
from types import MappingProxyType
from typing import Any

from server.accelerator_options import instance_device, instance_group
from server.backends.python.instance import PythonInstance
from server.backends.python.process import Launch, ModelProcess
from server.backends.python.signature import (
    MLMODEL_FILE,
    Field,
    SignatureError,
    read_signature,
)
from server.backends.shapes import check_dims
from server.errors import ModelLoadError
from server.parameters import Key, integer, number, text
from server.security.paths import confined
from server.spec import BatchingSpec, ModelSpec, TensorSpec
from server.types import DataType

log = logging.getLogger(__name__)

REGION_BYTES = Key(
    "python_shm_bytes", integer(4096, 1 << 36),
    "the size of each of an instance's two shared-memory regions (inputs, outputs); a "
    "request whose inputs or outputs do not fit alone is refused RESOURCE_EXHAUSTED",
    str(64 << 20))
STARTUP_TIMEOUT_S = Key(
    "python_startup_timeout_s", number(0.1),
    "how long a model process may take to start and initialize (and to auto-complete)", "120")
MODELS_OWN = Key("", text, "a Python model's own setting, read by model.py from "
                 "args['model_config']", member="<any other key>")
#: The Triton key of custom execution environments, refused with a reason.
EXECUTION_ENV_PATH = "EXECUTION_ENV_PATH"


def _launch(spec: ModelSpec, version_dir: str, index: int, kind: str,
            model_file: Path) -> Launch:
    """A process's start, and the ``args`` initialize gets, as Triton names them."""
    group, within = instance_group(spec, index)
    # Absolute: the model process runs in the version directory (and model.py builds its
    # paths from these, as in Triton), whatever --model-repository was given as.
    directory = Path(version_dir).resolve()
    args = {
        "model_config": json.dumps(model_config(spec)),
        "model_instance_kind": "GPU" if group.kind == "GPU" else "CPU",
        "model_instance_device_id": str(instance_device(spec, index)),
        "model_instance_name": f"{spec.name}_{spec.instances.index(group)}_{within}",
        "model_repository": str(directory.parent),
        "model_version": directory.name,
        "model_name": spec.name,
    }
    return Launch(model=spec.name, version=directory.name, instance=index, kind=kind,
                  version_dir=directory, model_file=model_file.resolve(),
                  args=MappingProxyType(args),
                  region_bytes=REGION_BYTES.value(spec.parameters, spec.name),
                  startup_timeout_s=STARTUP_TIMEOUT_S.value(spec.parameters, spec.name))


def model_config(spec: ModelSpec) -> dict[str, Any]:
    """The model's configuration as the JSON object Triton hands initialize (the fields a
    Python model reads: tensors, batching, instance groups, parameters)."""
    config: dict[str, Any] = {
        "name": spec.name, "platform": spec.platform, "backend": spec.backend,
        "max_batch_size": spec.max_batch_size,
        "input": [{"name": t.name, "data_type": t.datatype.config_name, "dims": list(t.dims),
                   "optional": t.optional} for t in spec.inputs],
        "output": [{"name": t.name, "data_type": t.datatype.config_name, "dims": list(t.dims)}
                   for t in spec.outputs],
        "instance_group": [{"name": f"{spec.name}_{i}", "kind": f"KIND_{g.kind}",
                            "count": g.count, "gpus": list(g.gpus)}
                           for i, g in enumerate(spec.instances)],
        "parameters": {k: {"string_value": v} for k, v in spec.parameters.items()},
        "default_model_filename": spec.default_model_filename,
        "model_transaction_policy": {"decoupled": False},
    }
    if spec.batching.enabled:
        config["dynamic_batching"] = {
            "preferred_batch_size": list(spec.batching.preferred_batch_sizes),
            "max_queue_delay_microseconds": spec.batching.max_queue_delay_us,
        }
    return config


def _check_common(spec: ModelSpec) -> None:
    if spec.preprocess is not None:
        raise ModelLoadError(f"model '{spec.name}': image preprocessing (preprocess.*) is for "
                             f"batched tensor models; a {spec.backend} model does its own")


class PythonFactory:
    """``backend: "python"``: a TritonPythonModel in ``<version>/model.py``."""

    parameter_keys = (REGION_BYTES, STARTUP_TIMEOUT_S, MODELS_OWN)

    def model_path(self, spec: ModelSpec, version_dir: str) -> Path:
        path = confined(Path(version_dir), spec.default_model_filename,
                        "default_model_filename", "the version directory")
        if not path.is_file():
            raise ModelLoadError(f"model file '{path}' is missing")
        return path

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        _check_common(spec)
        if EXECUTION_ENV_PATH in spec.parameters:
            raise ModelLoadError(
                f"model '{spec.name}': {EXECUTION_ENV_PATH} (a custom execution environment) "
                "is not supported: Python models run in the server's own Python environment")
        path = self.model_path(spec, version_dir)
        if _defines_auto_complete(path):
            spec = self._auto_complete(spec, version_dir, path)
        if not spec.inputs or not spec.outputs:
            raise ModelLoadError(
                f"model '{spec.name}': a Python model declares its inputs and outputs in "
                "config.pbtxt (or completes them in TritonPythonModel.auto_complete_config)")
        return spec

    def _auto_complete(self, spec: ModelSpec, version_dir: str, path: Path) -> ModelSpec:
        """Run the model's auto_complete_config in a process of its own, on the config as it
        is, and take the max_batch_size, dynamic batching and tensors it set."""
        launch = dataclasses.replace(_launch(spec, version_dir, 0, "python", path),
                                     region_bytes=4096)
        process = ModelProcess(launch, lambda _: None)
        try:
            reply = process.ask({"op": "auto_complete", "model_file": str(path),
                                 "config": model_config(spec)}, "auto_complete_config")
        finally:
            process.stop(STARTUP_TIMEOUT_S.value(spec.parameters, spec.name))
        return _completed(spec, reply.get("config"))

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> PythonInstance:
        launch = _launch(spec, version_dir, instance_index, "python",
                         self.model_path(spec, version_dir))
        instance = PythonInstance(spec, launch, "python model.py, a process per instance")
        log.info("python instance loaded", extra={"model": spec.name,
                                                  "instance": instance_index,
                                                  "pid": instance.pid})
        return instance


#: One ast.parse at a time: models load on several threads at once, and CPython 3.11 keeps
#: the AST constructor's recursion depth in state the threads share, so two parses at once
#: can fail with "AST constructor recursion depth mismatch" (CPython gh-106905; seen at a
#: start that loaded two Python models).
_PARSING = threading.Lock()


def _defines_auto_complete(path: Path) -> bool:
    """Whether model.py's TritonPythonModel defines auto_complete_config (read, not run: the
    server never imports a model's code)."""
    try:
        source = path.read_bytes()
        with _PARSING:
            tree = ast.parse(source, str(path))
    except (SyntaxError, ValueError, OSError):
        return False  # its own load says what is wrong
    return any(isinstance(node, ast.ClassDef) and node.name == "TritonPythonModel"
               and any(isinstance(item, ast.FunctionDef) and item.name == "auto_complete_config"
                       for item in node.body)
               for node in tree.body)


def _completed(spec: ModelSpec, config: object) -> ModelSpec:
    where = f"model '{spec.name}': auto_complete_config"
    if not isinstance(config, dict):
        raise ModelLoadError(f"{where} returned no configuration")
    try:
        max_batch = int(config.get("max_batch_size", spec.max_batch_size))
        inputs = tuple(_tensor(t, input_=True) for t in config.get("input", []))
        outputs = tuple(_tensor(t, input_=False) for t in config.get("output", []))
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        raise ModelLoadError(f"{where} returned a configuration that cannot be served: "
                             f"{exc!r}") from None
    if max_batch < 0 or spec.max_batch_size > max_batch:
        raise ModelLoadError(f"{where} set max_batch_size {max_batch}; the config's "
                             f"{spec.max_batch_size} may not exceed it")
    max_batch = spec.max_batch_size or max_batch
    batching = spec.batching
    if "dynamic_batching" in config and not batching.enabled and max_batch > 0:
        batching = BatchingSpec(enabled=True)
    return dataclasses.replace(spec, max_batch_size=max_batch, inputs=inputs, outputs=outputs,
                               batching=batching)


def _tensor(entry: dict[str, Any], input_: bool) -> TensorSpec:
    return TensorSpec(str(entry["name"]), DataType.from_config(str(entry["data_type"])),
                      tuple(int(d) for d in entry["dims"]),
                      optional=bool(entry.get("optional", False)) and input_)


class MlflowPyfuncFactory:
    """``backend: "mlflow_pyfunc"``: an MLflow model (its MLmodel file) in the version
    directory, loaded with ``mlflow.pyfunc.load_model`` in the model process."""

    parameter_keys = (REGION_BYTES, STARTUP_TIMEOUT_S)

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        _check_common(spec)
        try:
            signature = read_signature(Path(version_dir))
        except (SignatureError, OSError) as exc:
            raise ModelLoadError(f"model '{spec.name}' version {Path(version_dir).name}: "
                                 f"{exc}") from None
        inputs = _complete(spec, "input", spec.inputs, signature.inputs)
        outputs = _complete(spec, "output", spec.outputs, signature.outputs)
        return dataclasses.replace(spec, inputs=inputs, outputs=outputs)

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> PythonInstance:
        launch = _launch(spec, version_dir, instance_index, "mlflow_pyfunc",
                         Path(version_dir) / MLMODEL_FILE)
        instance = PythonInstance(spec, launch, "mlflow pyfunc, a process per instance")
        log.info("mlflow pyfunc instance loaded", extra={"model": spec.name,
                                                         "instance": instance_index,
                                                         "pid": instance.pid})
        return instance


def _complete(spec: ModelSpec, kind: str, declared: tuple[TensorSpec, ...],
              fields: tuple[Field, ...]) -> tuple[TensorSpec, ...]:
    """The config's tensors checked against the signature's, or taken from it."""
    by_name = {f.name: f for f in fields}
    where = "the MLflow model's signature"
    for tensor in declared:
        field = by_name.get(tensor.name)
        if field is None:
            raise ModelLoadError(f"config {kind} '{tensor.name}' is not in {where}; its "
                                 f"{kind}s are {sorted(by_name)}")
        if field.datatype is not tensor.datatype:
            raise ModelLoadError(f"config {kind} '{tensor.name}' is "
                                 f"{tensor.datatype.config_name} but {where} says "
                                 f"{field.datatype.config_name}")
        check_dims(spec, kind, tensor, field.shape, where)
    if declared:
        missing = set(by_name) - {t.name for t in declared}
        if kind == "input" and missing:
            raise ModelLoadError(f"{where}'s inputs {sorted(missing)} are missing from the "
                                 "config")
        return declared
    return tuple(TensorSpec(f.name, f.datatype, f.shape[1:] if spec.batches else f.shape)
                 for f in fields)
