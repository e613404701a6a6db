"""The Python backends' factories: config parsing, completion, parameters, initialize's args."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.app import check_model_parameters
from server.backends.python.factory import (
    MlflowPyfuncFactory,
    PythonFactory,
    _completed,
    _defines_auto_complete,
    _launch,
    model_config,
)
from server.errors import ModelLoadError
from server.repository.model_config import read_config, to_spec
from server.spec import ModelSpec
from server.types import DataType

TENSORS = ('input [ { name: "X" data_type: TYPE_FP32 dims: [ 2 ] } ]\n'
           'output [ { name: "Y" data_type: TYPE_STRING dims: [ 1 ] } ]\n')


def spec_of(tmp_path: Path, config: str, files: dict[str, str] | None = None) -> ModelSpec:
    model_dir = tmp_path / "m"
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    for name, text in (files or {}).items():
        (model_dir / "1" / name).write_text(text)
    return to_spec(read_config(model_dir), model_dir)


def test_a_python_model_has_no_platform_and_a_model_py(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'backend: "python"\nmax_batch_size: 8\n' + TENSORS)
    assert (spec.backend, spec.platform, spec.default_model_filename) == \
        ("python", "", "model.py")


def test_an_mlflow_model_without_a_backend_is_found_by_its_mlmodel(tmp_path: Path) -> None:
    assert spec_of(tmp_path, "", {"MLmodel": "x"}).backend == "mlflow_pyfunc"
    assert spec_of(tmp_path, "", {"MLmodel": "x"}).default_model_filename == "MLmodel"
    # The ONNX flavour keeps a model.onnx beside its MLmodel: served as ONNX.
    assert spec_of(tmp_path, "", {"model.onnx": "x"}).backend == "onnxruntime"


def test_a_python_model_owns_its_parameters_an_mlflow_model_does_not(tmp_path: Path) -> None:
    extra = 'parameters { key: "tokenizer" value { string_value: "bpe.json" } }\n'
    python = spec_of(tmp_path, 'backend: "python"\n' + TENSORS + extra)
    check_model_parameters(python, PythonFactory())
    mlflow = spec_of(tmp_path, 'backend: "mlflow_pyfunc"\n' + extra)
    with pytest.raises(ModelLoadError, match="'tokenizer' is not a key"):
        check_model_parameters(mlflow, MlflowPyfuncFactory())
    bad = spec_of(tmp_path, 'backend: "python"\n' + TENSORS +
                  'parameters { key: "python_shm_bytes" value { string_value: "1" } }\n')
    with pytest.raises(ModelLoadError, match="python_shm_bytes"):
        check_model_parameters(bad, PythonFactory())


def test_completion_refuses_what_is_not_supported(tmp_path: Path) -> None:
    factory = PythonFactory()
    version = str(tmp_path / "m" / "1")
    model = {"model.py": "class TritonPythonModel:\n    pass\n"}
    env = spec_of(tmp_path, 'backend: "python"\n' + TENSORS +
                  'parameters { key: "EXECUTION_ENV_PATH" value { string_value: "e.tgz" } }\n',
                  model)
    with pytest.raises(ModelLoadError, match="EXECUTION_ENV_PATH"):
        factory.complete_spec(env, version)
    bare = spec_of(tmp_path, 'backend: "python"\n', model)
    with pytest.raises(ModelLoadError, match=r"declares its inputs and outputs in config\.pbtxt"):
        factory.complete_spec(bare, version)
    image = spec_of(tmp_path, 'backend: "python"\nmax_batch_size: 2\n'
                    'input [ { name: "X" data_type: TYPE_FP32 dims: [ 3, 8, 8 ] } ]\n'
                    'output [ { name: "Y" data_type: TYPE_FP32 dims: [ 1 ] } ]\n'
                    'parameters { key: "preprocess.input" value { string_value: "X" } }\n',
                    model)
    with pytest.raises(ModelLoadError, match="preprocessing"):
        factory.complete_spec(image, version)


def test_auto_complete_is_found_without_running_the_model(tmp_path: Path) -> None:
    path = tmp_path / "model.py"
    path.write_text("import nothing_that_exists\nclass TritonPythonModel:\n"
                    "    @staticmethod\n    def auto_complete_config(c):\n        return c\n")
    assert _defines_auto_complete(path)
    path.write_text("class TritonPythonModel:\n    def execute(self, r):\n        return r\n")
    assert not _defines_auto_complete(path)
    path.write_text("class TritonPythonModel(:\n")
    assert not _defines_auto_complete(path)


def test_what_auto_complete_may_set(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'backend: "python"\n')
    tensors = {"input": [{"name": "X", "data_type": "TYPE_FP32", "dims": [2],
                          "optional": True}],
               "output": [{"name": "Y", "data_type": "TYPE_INT8", "dims": ["3"]}]}
    done = _completed(spec, {**tensors, "max_batch_size": 4, "dynamic_batching": {}})
    assert done.max_batch_size == 4 and done.batching.enabled
    assert done.inputs[0].optional and done.outputs[0].dims == (3,)
    capped = spec_of(tmp_path, 'backend: "python"\nmax_batch_size: 8\n')
    with pytest.raises(ModelLoadError, match="may not exceed"):
        _completed(capped, {**tensors, "max_batch_size": 4})
    with pytest.raises(ModelLoadError, match="cannot be served"):
        _completed(spec, {"input": [{"name": "X", "data_type": "TYPE_NOPE", "dims": [1]}]})


def test_initialize_gets_triton_s_args(tmp_path: Path) -> None:
    spec = spec_of(tmp_path, 'backend: "python"\nmax_batch_size: 8\n' + TENSORS +
                   'instance_group [ { count: 1 kind: KIND_CPU }, { count: 2 kind: KIND_GPU '
                   'gpus: [ 1 ] } ]\ndynamic_batching { max_queue_delay_microseconds: 50 }\n'
                   'parameters { key: "k" value { string_value: "v" } }\n')
    relative = os.path.relpath(tmp_path / "m" / "1")  # as --model-repository may give it
    launch = _launch(spec, relative, 2, "python", Path(relative) / "model.py")
    assert launch.model_file == tmp_path.resolve() / "m" / "1" / "model.py"
    args = dict(launch.args)
    config = json.loads(args.pop("model_config"))
    assert args == {"model_instance_kind": "GPU", "model_instance_device_id": "1",
                    "model_instance_name": "m_1_1",
                    "model_repository": str(tmp_path.resolve() / "m"),
                    "model_version": "1", "model_name": "m"}
    assert config == model_config(spec)
    assert config["input"] == [{"name": "X", "data_type": "TYPE_FP32", "dims": [2],
                                "optional": False}]
    assert config["output"][0]["data_type"] == DataType.BYTES.config_name
    assert config["parameters"] == {"k": {"string_value": "v"}}
    assert config["dynamic_batching"]["max_queue_delay_microseconds"] == 50
    assert config["max_batch_size"] == 8 and config["backend"] == "python"
