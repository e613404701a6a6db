"""Model config ``parameters``: the keys each component declares, and the load-time check that
turns an unknown key or a bad value into a load error naming the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from server.app import PARAMETER_KEYS, backend_factories, check_model_parameters
from server.backends.onnxruntime import OnnxRuntimeFactory
from server.backends.python.factory import MODELS_OWN, MlflowPyfuncFactory, PythonFactory
from server.backends.pytorch import PyTorchFactory
from server.backends.tensorrt import TensorRtFactory
from server.errors import ModelLoadError
from server.interfaces import BackendFactory
from server.parameters import Key, boolean, check, choice, integer, names, number, optional, text
from server.repository.model_config import REPOSITORY_KEYS, read_config, to_spec
from server.spec import ModelSpec, TensorSpec
from server.types import DataType
from tests import model_factory

ORT_KEYS = OnnxRuntimeFactory.parameter_keys
TRT_KEYS = TensorRtFactory.parameter_keys
TORCH_KEYS = PyTorchFactory.parameter_keys
PYTHON_KEYS = PythonFactory.parameter_keys
PYFUNC_KEYS = MlflowPyfuncFactory.parameter_keys
#: Every key but the backends': the repository's and those of the components the app composes.
COMPONENT_KEYS = (*REPOSITORY_KEYS, *PARAMETER_KEYS)
#: Every declared key but the Python backend's own catch-all (a model.py's own settings).
EVERY_KEY = tuple(dict.fromkeys((*COMPONENT_KEYS, *ORT_KEYS, *TRT_KEYS, *TORCH_KEYS,
                                 *PYFUNC_KEYS)))
FACTORIES: dict[object, BackendFactory] = {ORT_KEYS: OnnxRuntimeFactory(),
                                           TRT_KEYS: TensorRtFactory(),
                                           TORCH_KEYS: PyTorchFactory(),
                                           PYTHON_KEYS: PythonFactory(),
                                           PYFUNC_KEYS: MlflowPyfuncFactory()}


def check_parameters(checked: ModelSpec, backend_keys: tuple[Key[object], ...]) -> None:
    """The load-time check, as the server runs it for a model of that backend."""
    check_model_parameters(checked, FACTORIES[backend_keys])


def spec(backend: str = "onnxruntime", **parameters: str) -> ModelSpec:
    return ModelSpec(name="m", platform="", backend=backend, max_batch_size=8,
                     inputs=(TensorSpec("x", DataType.FP32, (4,)),),
                     outputs=(TensorSpec("y", DataType.FP32, (4,)),), parameters=parameters)


# -- the check -------------------------------------------------------------------------------


def test_an_unknown_key_is_named_with_the_keys_that_exist() -> None:
    with pytest.raises(ModelLoadError) as raised:
        check_parameters(spec(drift_windw="10"), ORT_KEYS)
    message = str(raised.value)
    assert "model 'm' parameter 'drift_windw' is not a key" in message
    assert "did you mean 'drift_window'?" in message
    known = message.split("the keys are: ")[1].split(", ")
    assert known == sorted({k.label for k in (*COMPONENT_KEYS, *ORT_KEYS)})
    assert {"drift_window", "queue_delay", "preprocess.input", "ragged_pad.<input>",
            "intra_op_thread_count", "trt_shape_<input>"} <= set(known)


def test_keys_of_another_server_are_unknown_too() -> None:
    # Triton's ONNX Runtime backend reads these; this server does not.
    for key in ("enable_mem_arena", "max_batch_size", "cudnn_conv_use_max_workspace"):
        with pytest.raises(ModelLoadError, match=f"'{key}' is not a key"):
            check_parameters(spec(**{key: "1"}), ORT_KEYS)


def test_the_backend_decides_which_backend_keys_exist() -> None:
    check_parameters(spec("tensorrt", trt_precision="fp16"), TRT_KEYS)
    check_parameters(spec(intra_op_thread_count="1"), ORT_KEYS)
    with pytest.raises(ModelLoadError, match="'trt_precision' is not a key"):
        check_parameters(spec(trt_precision="fp16"), ORT_KEYS)
    with pytest.raises(ModelLoadError, match="'intra_op_thread_count' is not a key"):
        check_parameters(spec("tensorrt", intra_op_thread_count="1"), TRT_KEYS)
    check_parameters(spec("pytorch", cuda_graphs="true"), TORCH_KEYS)
    with pytest.raises(ModelLoadError, match="'trt_cuda_graphs' is not a key"):
        check_parameters(spec("pytorch", trt_cuda_graphs="true"), TORCH_KEYS)
    # A Python model's other keys are its own (model.py reads them), as in Triton; the keys
    # of the server's components are still checked.
    check_parameters(spec("python", tokenizer="bpe.json", trt_precision="x"), PYTHON_KEYS)
    with pytest.raises(ModelLoadError, match="'queue_delay' must be one of"):
        check_parameters(spec("python", queue_delay="lazy"), PYTHON_KEYS)
    with pytest.raises(ModelLoadError, match="'tokenizer' is not a key"):
        check_parameters(spec("mlflow_pyfunc", tokenizer="bpe.json"), PYFUNC_KEYS)


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("allow_spinning", "sometimes", "true or false"),
    ("intra_op_thread_count", "-1", "an integer >= 0"),
    ("inline_execution_max_us", "fast", "an integer >= 0"),
    ("trt_builder_optimization_level", "9", r"an integer in 0\.\.5"),
    ("drift_sample_rate", "1.5", r"a number in 0\.0\.\.1\.0"),
    ("drift_psi_alert", "-1", r"a number >= 0\.0"),
    ("queue_delay", "lazy", r"one of \['adaptive', 'fixed'\]"),
    ("graph_optimization_level", "max", r"one of \['disable_all', 'basic', .*\]"),
    ("trt_shape_x", "1:2", r"MIN:OPT:MAX \(.*\) or one shape"),
    ("ragged_pad.X", "zero", "a number"),
    ("preprocess.crop", "32", r'"H,W" with sizes in 1\.\.16384'),
    ("python_shm_bytes", "1k", r"an integer in 4096\.\.\d+"),
])
def test_a_bad_value_names_the_key_the_value_and_what_was_expected(
    key: str, value: str, expected: str,
) -> None:
    with pytest.raises(ModelLoadError) as raised:
        check({key: value}, EVERY_KEY, "m")
    assert re.search(f"model 'm' parameter '{re.escape(key)}' must be {expected}, "
                     f"got '{re.escape(value)}'", str(raised.value)), raised.value


def test_drift_settings_that_disagree_are_a_load_error() -> None:
    with pytest.raises(ModelLoadError, match="'drift_js_alert' must not be below"):
        check_parameters(spec(drift_js_warning="0.5", drift_js_alert="0.2"), ORT_KEYS)


def test_an_empty_value_stands_for_the_default() -> None:
    key = Key("k", integer(1), "k", "7")
    assert key.value({"k": "  "}, "m") == 7 == key.value({}, "m")
    check({"k": ""}, (key,), "m")


# -- families of keys ------------------------------------------------------------------------

FAMILY = Key("shape_", integer(1), "per input", "2", member="<input>")


def test_a_family_owns_every_member_and_parses_each() -> None:
    params = {"shape_a": "3", "shape_b": "4", "other": "x"}
    assert FAMILY.values(params, "m") == {"a": 3, "b": 4}
    assert FAMILY.value(params, "m", "a") == 3 and FAMILY.value(params, "m", "c") == 2
    assert FAMILY.label == "shape_<input>"
    with pytest.raises(ModelLoadError, match="'shape_b' must be an integer >= 1, got '0'"):
        check({"shape_a": "3", "shape_b": "0"}, (FAMILY,), "m")


def test_a_family_member_needs_a_name() -> None:
    with pytest.raises(ModelLoadError, match="'shape_' names no <input>"):
        check({"shape_": "3"}, (FAMILY,), "m")


def test_a_single_key_is_preferred_over_a_family_it_starts() -> None:
    exact = Key("shape_all", boolean, "all of them", "false")
    params = {"shape_all": "true"}
    check(params, (FAMILY, exact), "m")  # not an integer: the single key owns it
    assert exact.value(params, "m") is True
    # A bad value is judged by the single key's parser, not the family's.
    with pytest.raises(ModelLoadError, match="'shape_all' must be true or false, got 'seven'"):
        check({"shape_all": "seven"}, (FAMILY, exact), "m")
    with pytest.raises(ModelLoadError, match="'shape_a' must be an integer"):
        check({"shape_all": "true", "shape_a": "true"}, (FAMILY, exact), "m")


# -- parsers ---------------------------------------------------------------------------------


def test_parsers() -> None:
    assert boolean("Yes") is True and boolean("off") is False
    assert names(" a, ,b ") == ("a", "b") and names("") == ()
    assert choice("NCHW", "NHWC")("nhwc") == "NHWC"
    with pytest.raises(ValueError, match="one of"):
        choice("fixed", case_sensitive=True)("Fixed")
    assert optional(integer())("") is None and optional(text)("p") == "p"
    with pytest.raises(ValueError, match="a number"):
        number()("nan")


# -- the declarations ------------------------------------------------------------------------


#: Families without a default: each member given must have a value.
NEEDS_A_VALUE = {"trt_shape_<input>"}


@pytest.mark.parametrize("key", EVERY_KEY, ids=lambda k: k.label)
def test_every_declared_key_parses_its_documented_default(key: Key[object]) -> None:
    assert key.meaning
    if key.label in NEEDS_A_VALUE:
        with pytest.raises(ValueError):
            key.parse(key.default)
    else:
        key.parse(key.default)


@pytest.mark.parametrize("backend_keys", [ORT_KEYS, TRT_KEYS, TORCH_KEYS, PYTHON_KEYS,
                                          PYFUNC_KEYS],
                         ids=["onnxruntime", "tensorrt", "pytorch", "python", "mlflow_pyfunc"])
def test_no_key_has_two_owners(backend_keys: tuple[Key[object], ...]) -> None:
    labels = [k.label for k in (*COMPONENT_KEYS, *backend_keys)]
    assert len(labels) == len(set(labels))
    # The Python backend's catch-all owns what no one else does (it is checked last).
    families = [k for k in (*COMPONENT_KEYS, *backend_keys) if k.member and k is not MODELS_OWN]
    for family in families:
        assert not [k.label for k in (*COMPONENT_KEYS, *backend_keys)
                    if k is not family and family.owns(k.name)]


def test_every_registered_backend_declares_its_keys() -> None:
    factories = backend_factories()
    assert set(factories) == {"onnxruntime", "tensorrt", "pytorch", "python", "mlflow_pyfunc"}
    assert factories["onnxruntime"].parameter_keys == ORT_KEYS
    assert factories["tensorrt"].parameter_keys == TRT_KEYS
    assert factories["pytorch"].parameter_keys == TORCH_KEYS
    assert factories["python"].parameter_keys == PYTHON_KEYS
    assert factories["mlflow_pyfunc"].parameter_keys == PYFUNC_KEYS
    assert PYTHON_KEYS[-1] is MODELS_OWN  # last: every declared key is found before it


# -- configs this project writes stay valid --------------------------------------------------


def test_example_and_test_factory_configs_have_only_known_keys(
    tmp_path: Path, examples_repo: Path,
) -> None:
    model_factory.add_sub_model(tmp_path, "add_sub")
    model_factory.add_sub_model(tmp_path, "fixed", queue_delay="fixed")
    model_dirs = [*sorted(p for p in examples_repo.iterdir() if p.is_dir()),
                  tmp_path / "add_sub", tmp_path / "fixed"]
    for model_dir in model_dirs:
        parsed = to_spec(read_config(model_dir), model_dir)
        check_model_parameters(parsed, backend_factories()[parsed.backend])
