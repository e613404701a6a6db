"""GPU config parameters (server/accelerator_options.py) without a GPU: TensorRT options and
optimisation profiles, ONNX Runtime provider options, instance devices, and their validation
when config.pbtxt is read."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.accelerator_options import (
    OrtGpuOptions,
    ShapeRange,
    TrtOptions,
    instance_device,
    optimisation_profile,
    ort_gpu_providers,
    parse_ort_gpu_options,
    parse_shape_range,
    parse_trt_options,
    profile_text,
    require_fixed_shapes,
)
from server.errors import ModelLoadError
from server.repository.model_config import to_spec
from server.spec import BatchingSpec, InstanceSpec, ModelSpec, TensorSpec
from server.types import DataType
from tests import model_factory


def spec(*inputs: TensorSpec, max_batch_size: int = 8, preferred: tuple[int, ...] = (),
         instances: tuple[InstanceSpec, ...] = (InstanceSpec("GPU", 1),),
         parameters: dict[str, str] | None = None) -> ModelSpec:
    return ModelSpec(
        name="m", platform="tensorrt_plan", backend="tensorrt", max_batch_size=max_batch_size,
        inputs=inputs or (TensorSpec("x", DataType.FP32, (3, 32, 32)),),
        outputs=(TensorSpec("y", DataType.FP32, (10,)),),
        batching=BatchingSpec(enabled=max_batch_size > 0, preferred_batch_sizes=preferred),
        instances=instances, parameters=parameters or {},
    )


# -- TensorRT options ------------------------------------------------------------------------


def test_trt_options_defaults_and_values() -> None:
    assert parse_trt_options({}, "m") == TrtOptions()
    options = parse_trt_options({
        "trt_build_from_onnx": "true", "trt_precision": "INT8,fp16", "trt_workspace_mb": "512",
        "trt_builder_optimization_level": "5", "trt_cuda_graphs": "yes",
        "trt_engine_cache_dir": "engines", "trt_timing_cache": "t.cache",
        "trt_shape_tokens": "1:64:256", "other": "ignored",
    }, "m")
    assert options.build_from_onnx and options.cuda_graphs
    assert options.precision == ("int8", "fp16")
    assert options.precision_flags == ("fp16", "int8")
    assert options.precision_name == "fp16+int8"
    assert options.workspace_mb == 512 and options.builder_optimization_level == 5
    assert options.engine_cache_dir == "engines" and options.timing_cache == "t.cache"
    assert options.shapes["tokens"] == ShapeRange((1,), (64,), (256,))
    assert TrtOptions().precision_flags == () and TrtOptions().precision_name == "fp32"


@pytest.mark.parametrize(("params", "message"), [
    ({"trt_precision": "fp8"}, "'trt_precision' must be one of"),
    ({"trt_precision": "fp32,fp16"}, "do not combine"),
    ({"trt_precision": ","}, "'trt_precision' must be one of"),
    ({"trt_workspace_mb": "0"}, "'trt_workspace_mb' must be an integer >= 1, got '0'"),
    ({"trt_workspace_mb": "lots"}, "must be an integer"),
    ({"trt_builder_optimization_level": "6"}, r"must be an integer in 0\.\.5"),
    ({"trt_cuda_graphs": "maybe"}, "must be true or false"),
    ({"trt_build_from_onnx": "2"}, "must be true or false"),
    ({"trt_shape_": "1"}, "names no <input>"),
    ({"trt_shape_x": "1x0"}, "positive dims"),
    ({"trt_shape_x": "4:2:8"}, "MIN <= OPT <= MAX"),
    ({"trt_shape_x": "1:2"}, "'trt_shape_x' must be MIN:OPT:MAX"),
    ({"trt_shape_x": "1x2:2:3"}, "of one rank"),
    ({"trt_shape_x": "a"}, "'trt_shape_x' must be MIN:OPT:MAX"),
])
def test_trt_options_errors_name_the_parameter(params: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message) as raised:
        parse_trt_options(params, "m")
    assert "model 'm'" in str(raised.value)


def test_shape_ranges() -> None:
    fixed = parse_shape_range("3x224x224")
    assert fixed.min == fixed.opt == fixed.max == (3, 224, 224)
    ranged = parse_shape_range(" 1,16 : 8x128 : 8x512 ")
    assert ranged == ShapeRange((1, 16), (8, 128), (8, 512))


# -- optimisation profiles -------------------------------------------------------------------


def test_profile_batch_dim_runs_from_one_to_max_optimised_for_largest_preferred() -> None:
    profile = optimisation_profile(spec(max_batch_size=32, preferred=(8, 16)), {})
    assert profile == {"x": ShapeRange((1, 3, 32, 32), (16, 3, 32, 32), (32, 3, 32, 32))}
    plain = optimisation_profile(spec(max_batch_size=32), {})
    assert plain["x"].opt == (32, 3, 32, 32)


def test_profile_dynamic_dims_come_from_trt_shape_parameters() -> None:
    tokens = TensorSpec("tokens", DataType.INT64, (-1,))
    mask = TensorSpec("mask", DataType.INT64, (2, -1))
    model = spec(tokens, mask, max_batch_size=4)
    shapes = {"tokens": parse_shape_range("1:64:256"),
              "mask": parse_shape_range("2x1:2x64:2x256")}
    profile = optimisation_profile(model, shapes)
    assert profile["tokens"] == ShapeRange((1, 1), (4, 64), (4, 256))
    assert profile["mask"] == ShapeRange((1, 2, 1), (4, 2, 64), (4, 2, 256))
    assert profile_text(profile, "max") == "tokens:4x256,mask:4x2x256"
    assert profile_text(profile, "min") == "tokens:1x1,mask:1x2x1"


def test_profile_without_batching_uses_the_dims_as_they_are() -> None:
    model = spec(TensorSpec("x", DataType.FP32, (4, -1)), max_batch_size=0)
    profile = optimisation_profile(model, {"x": parse_shape_range("4x1:4x8:4x16")})
    assert profile == {"x": ShapeRange((4, 1), (4, 8), (4, 16))}


@pytest.mark.parametrize(("dims", "shape", "message"), [
    ((-1,), None, "give the range of its -1 dims with parameter 'trt_shape_x'"),
    ((3, -1), "1:2:3", "has 1 dims, the input has 2"),
    ((3, -1), "4x1:4x2:4x3", "dim 0 is fixed at 3"),
])
def test_profile_errors(dims: tuple[int, ...], shape: str | None, message: str) -> None:
    shapes = {} if shape is None else {"x": parse_shape_range(shape)}
    with pytest.raises(ModelLoadError, match=message):
        optimisation_profile(spec(TensorSpec("x", DataType.FP32, dims)), shapes)


def test_profile_rejects_shapes_for_unknown_inputs() -> None:
    with pytest.raises(ModelLoadError, match="'trt_shape_nope' names no input"):
        optimisation_profile(spec(), {"nope": parse_shape_range("1")})


# -- instances -------------------------------------------------------------------------------


def test_instance_devices_cycle_through_each_groups_gpus() -> None:
    model = spec(instances=(InstanceSpec("GPU", 3, (2, 3)), InstanceSpec("GPU", 2),
                            InstanceSpec("AUTO", 1, (5,))))
    assert [instance_device(model, i) for i in range(6)] == [2, 3, 2, 0, 0, 5]


# -- ONNX Runtime provider options -----------------------------------------------------------

CUDA_ONLY = ["CUDAExecutionProvider", "CPUExecutionProvider"]
#: Where a model's provider caches are resolved (need not exist).
MODEL_DIR = Path("/models/m")
WITH_TRT = ["TensorrtExecutionProvider", *CUDA_ONLY]


def test_cuda_provider_options_from_parameters() -> None:
    options = parse_ort_gpu_options({
        "gpu_mem_limit": "2147483648", "cudnn_conv_algo_search": "heuristic",
        "arena_extend_strategy": "ksameasrequested",
    }, "m")
    assert options.accelerator == "cuda"
    providers = ort_gpu_providers(spec(), options, 1, CUDA_ONLY, MODEL_DIR)
    assert providers == [
        ("CUDAExecutionProvider", {"device_id": 1, "use_tf32": 0, "gpu_mem_limit": 2147483648,
                                   "cudnn_conv_algo_search": "HEURISTIC",
                                   "arena_extend_strategy": "kSameAsRequested"}),
        "CPUExecutionProvider",
    ]
    # The precision contract: the CUDA provider never rounds FP32 products to TF32.
    assert ort_gpu_providers(spec(), OrtGpuOptions(), 0, CUDA_ONLY, MODEL_DIR)[0] == (
        "CUDAExecutionProvider", {"device_id": 0, "use_tf32": 0})


def test_tensorrt_provider_options_with_an_explicit_profile() -> None:
    options = parse_ort_gpu_options({
        "execution_accelerator": "TensorRT", "trt_fp16": "true",
        "trt_engine_cache_path": "cache/ort", "trt_timing_cache_path": "cache/timing",
        "trt_workspace_mb": "1024", "trt_builder_optimization_level": "3",
    }, "m")
    providers = ort_gpu_providers(spec(max_batch_size=8, preferred=(4,)), options, 0, WITH_TRT,
                                  MODEL_DIR)
    name, trt = providers[0]  # type: ignore[misc]
    assert name == "TensorrtExecutionProvider"
    assert trt == {
        "device_id": 0, "trt_fp16_enable": True,
        "trt_engine_cache_enable": True, "trt_engine_cache_path": f"{MODEL_DIR}/cache/ort",
        "trt_timing_cache_enable": True, "trt_timing_cache_path": f"{MODEL_DIR}/cache/timing",
        "trt_max_workspace_size": 1024 << 20, "trt_builder_optimization_level": 3,
        "trt_profile_min_shapes": "x:1x3x32x32", "trt_profile_opt_shapes": "x:4x3x32x32",
        "trt_profile_max_shapes": "x:8x3x32x32",
    }
    assert [p if isinstance(p, str) else p[0] for p in providers] == WITH_TRT


def test_cuda_graphs_of_one_replayed_graph_need_fixed_shapes() -> None:
    options = parse_ort_gpu_options(
        {"execution_accelerator": "tensorrt", "trt_cuda_graphs": "true"}, "m")
    fixed = spec(max_batch_size=0)
    require_fixed_shapes(fixed)
    trt = ort_gpu_providers(fixed, options, 0, WITH_TRT, MODEL_DIR)[0][1]  # type: ignore[index]
    assert trt["trt_cuda_graph_enable"] is True
    # One captured graph replayed for every run: varying shapes would give stale outputs.
    with pytest.raises(ModelLoadError, match=r"'trt_cuda_graphs'.*same shapes.*max_batch_size "
                                             r"is 8 \(batches of 1..8 rows\)"):
        require_fixed_shapes(spec(max_batch_size=8))
    open_dims = spec(TensorSpec("x", DataType.FP32, (-1, 4)), max_batch_size=0)
    with pytest.raises(ModelLoadError, match=r"tensors \['x'\] have -1 dims"):
        require_fixed_shapes(open_dims)


def test_tensorrt_provider_caches_stay_inside_the_model_directory(tmp_path: Path) -> None:
    model_dir = tmp_path / "m"
    model_dir.mkdir()
    (model_dir / "out").symlink_to(tmp_path)
    options = parse_ort_gpu_options(
        {"execution_accelerator": "tensorrt", "trt_engine_cache_path": "out/engines"}, "m")
    with pytest.raises(ModelLoadError, match="trt_engine_cache_path 'out/engines' leads out"):
        ort_gpu_providers(spec(), options, 0, WITH_TRT, model_dir)


def test_tensorrt_provider_leaves_profiles_to_onnxruntime_when_dims_are_open() -> None:
    open_dims = spec(TensorSpec("x", DataType.FP32, (-1,)))
    options = parse_ort_gpu_options({"execution_accelerator": "tensorrt"}, "m")
    trt = ort_gpu_providers(open_dims, options, 0, WITH_TRT, MODEL_DIR)[0][1]  # type: ignore[index]
    assert "trt_profile_min_shapes" not in trt


def test_tensorrt_provider_missing_is_a_load_error() -> None:
    options = parse_ort_gpu_options({"execution_accelerator": "tensorrt"}, "m")
    with pytest.raises(ModelLoadError, match="asks for execution_accelerator tensorrt"):
        ort_gpu_providers(spec(), options, 0, CUDA_ONLY, MODEL_DIR)


@pytest.mark.parametrize(("params", "message"), [
    ({"trt_fp16": "true"}, "set parameter execution_accelerator to \"tensorrt\""),
    ({"execution_accelerator": "openvino"}, "must be one of \\['cuda', 'tensorrt'\\]"),
    ({"gpu_mem_limit": "-1"}, "must be an integer >= 1"),
    ({"cudnn_conv_algo_search": "fast"}, "must be one of"),
    ({"execution_accelerator": "tensorrt", "trt_engine_cache_path": "/etc"},
     "'trt_engine_cache_path' must be a relative path"),
    ({"execution_accelerator": "tensorrt", "trt_timing_cache_path": "../../other"},
     "'trt_timing_cache_path' must be a relative path"),
])
def test_ort_gpu_option_errors(params: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_ort_gpu_options(params, "m")


# -- validation when config.pbtxt is read ----------------------------------------------------

TRT_CONFIG = """\
name: "t"
platform: "tensorrt_plan"
max_batch_size: 8
{extra}
"""


def parse(tmp_path: Path, text: str) -> ModelSpec:
    from google.protobuf import text_format

    from server._pb import model_config_pb2 as mc

    config = mc.ModelConfig()
    text_format.Parse(text, config)
    model_dir = tmp_path / config.name
    model_dir.mkdir(exist_ok=True)
    return to_spec(config, model_dir)


def test_tensorrt_platform_and_backend_are_accepted(tmp_path: Path) -> None:
    plan = parse(tmp_path, TRT_CONFIG.format(extra=""))
    assert (plan.platform, plan.backend) == ("tensorrt_plan", "tensorrt")
    assert plan.default_model_filename == "model.plan"
    built = parse(tmp_path, TRT_CONFIG.format(
        extra='parameters { key: "trt_build_from_onnx" value { string_value: "true" } }'))
    assert built.default_model_filename == "model.onnx"
    by_backend = parse(tmp_path, 'name: "t" backend: "tensorrt"')
    assert by_backend.platform == "tensorrt_plan"
    named = parse(tmp_path, TRT_CONFIG.format(extra='default_model_filename: "engine.trt"'))
    assert named.default_model_filename == "engine.trt"
    onnx = parse(tmp_path, 'name: "t" platform: "onnxruntime_onnx"')
    assert (onnx.backend, onnx.default_model_filename) == ("onnxruntime", "model.onnx")


@pytest.mark.parametrize(("text", "message"), [
    ('name: "t" platform: "tensorrt_plan" backend: "onnxruntime"',
     "platform 'tensorrt_plan' is run by backend 'tensorrt', not 'onnxruntime'"),
    ('name: "t" platform: "tensorflow_savedmodel"',
     "platform 'tensorflow_savedmodel' is not supported"),
    ('name: "t" backend: "tensorflow"', "backend 'tensorflow' is not supported"),
    (TRT_CONFIG.format(extra="instance_group [ { kind: KIND_CPU } ]"),
     "TensorRT runs on GPUs"),
    (TRT_CONFIG.format(extra='parameters { key: "trt_precision" value { string_value: "fp64" } }'),
     "'trt_precision' must be one of"),
    ('name: "t" parameters { key: "trt_fp16" value { string_value: "true" } }',
     "execution_accelerator"),
])
def test_config_validation_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse(tmp_path, text)


def test_existing_example_configs_still_parse(tmp_path: Path, examples_repo: Path) -> None:
    from server.repository.model_config import read_config

    model_dirs = sorted(p for p in examples_repo.iterdir() if p.is_dir())
    assert model_dirs
    for model_dir in model_dirs:
        parsed = to_spec(read_config(model_dir), model_dir)
        python = (model_dir / "1" / "model.py").is_file()
        assert parsed.backend == ("python" if python else "onnxruntime")
    model_factory.add_sub_model(tmp_path, "add_sub")
    assert to_spec(read_config(tmp_path / "add_sub"), tmp_path / "add_sub").platform == \
        "onnxruntime_onnx"
