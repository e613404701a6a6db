"""``preprocess.*`` config parameters -> ImagePreprocess -> ModelSpec.client_inputs, and the
request validation that follows from them. Every load error names the key and the problem."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import text_format

from server._pb import model_config_pb2 as mc
from server.codec.validate import validate_request
from server.errors import InvalidInput, ModelLoadError
from server.preprocess.options import default_threads, parse_preprocess
from server.repository.model_config import to_spec
from server.spec import ImagePreprocess, ModelSpec, TensorSpec
from server.types import Array, DataType, InferRequest

IMAGE = TensorSpec("image", DataType.FP32, (3, 32, 32))
SCORES = TensorSpec("scores", DataType.FP32, (10,))


def spec_with(pre: ImagePreprocess | None, image: TensorSpec = IMAGE,
              max_batch_size: int = 8) -> ModelSpec:
    return ModelSpec(name="m", platform="onnxruntime_onnx", backend="onnxruntime",
                     max_batch_size=max_batch_size, inputs=(image,), outputs=(SCORES,),
                     preprocess=pre)


def test_parse_full_and_defaults() -> None:
    pre = parse_preprocess({
        "preprocess.input": "image", "preprocess.resize": "36", "preprocess.crop": "32,32",
        "preprocess.scale": "0.00392156862745098", "preprocess.mean": "0.485,0.456,0.406",
        "preprocess.std": "0.229, 0.224, 0.225", "preprocess.layout": "nchw",
        "preprocess.threads": "2", "intra_op_thread_count": "1",
    }, "m")
    assert pre == ImagePreprocess(input="image", resize_shorter=36, crop=(32, 32),
                                  scale=(0.00392156862745098,), mean=(0.485, 0.456, 0.406),
                                  std=(0.229, 0.224, 0.225), layout="NCHW", threads=2)
    assert parse_preprocess({"intra_op_thread_count": "1"}, "m") is None
    minimal = parse_preprocess({"preprocess.input": "image", "preprocess.resize": "40x48"}, "m")
    assert minimal is not None and minimal.resize == (40, 48) and minimal.crop is None
    assert minimal.threads == default_threads() and minimal.layout == "NCHW"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"preprocess.resize": "36"}, "need 'preprocess.input'"),
        ({"preprocess.input": "x", "preprocess.resize": "0"}, "'preprocess.resize' must be"),
        ({"preprocess.input": "x", "preprocess.resize": "1,2,3"}, "'preprocess.resize' must be"),
        ({"preprocess.input": "x", "preprocess.resize": "big"}, "'preprocess.resize' must be"),
        ({"preprocess.input": "x", "preprocess.crop": "32"}, "'preprocess.crop' must be \"H,W\""),
        ({"preprocess.input": "x", "preprocess.layout": "CHW"},
         r"'preprocess.layout' must be one of \['NCHW', 'NHWC'\]"),
        ({"preprocess.input": "x", "preprocess.mean": "a,b"},
         "'preprocess.mean' must be comma-separated finite"),
        ({"preprocess.input": "x", "preprocess.std": "1,0,1"},
         "'preprocess.std' must be .* none of them 0"),
        ({"preprocess.input": "x", "preprocess.scale": "inf"},
         "'preprocess.scale' must be comma-separated finite numbers"),
        ({"preprocess.input": "x", "preprocess.threads": "0"}, "'preprocess.threads' must be"),
        ({"preprocess.input": "x", "preprocess.threads": "two"}, "'preprocess.threads' must be"),
    ],
)
def test_parse_errors_name_the_key(params: dict[str, str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        parse_preprocess(params, "m")


@pytest.mark.parametrize(
    ("pre", "image", "message"),
    [
        (ImagePreprocess("nope"), IMAGE, "preprocess.input 'nope' is not an input"),
        (ImagePreprocess("image"), TensorSpec("image", DataType.INT32, (3, 32, 32)),
         "is TYPE_INT32; preprocessing produces"),
        (ImagePreprocess("image"), TensorSpec("image", DataType.FP32, (3, -1, 32)),
         r"needs three fixed dims \(\[C, H, W\]"),
        (ImagePreprocess("image", layout="NHWC"), TensorSpec("image", DataType.FP32, (32, 32)),
         r"\[H, W, C\]"),
        (ImagePreprocess("image"), TensorSpec("image", DataType.FP32, (5, 32, 32)),
         "has 5 channels"),
        (ImagePreprocess("image", mean=(1.0, 2.0)), IMAGE, "preprocess.mean has 2 values"),
        (ImagePreprocess("image", crop=(30, 30)), IMAGE, "crop 30,30 differs from the 32x32"),
        (ImagePreprocess("image", resize=(30, 40), crop=(32, 32)), IMAGE,
         "resize 30,40 is smaller than the 32x32 crop"),
        (ImagePreprocess("image", resize=(40, 40)), IMAGE,
         "resize 40,40 differs from the model input's 32x32"),
        (ImagePreprocess("image", resize_shorter=40), IMAGE, "add preprocess.crop \"32,32\""),
        (ImagePreprocess("image", resize_shorter=31, crop=(32, 32)), IMAGE,
         "resize 31 .shorter side. is smaller"),
        (ImagePreprocess("image", std=(1e-45,)), IMAGE, "does not fit a float32"),
    ],
)
def test_spec_checks_against_the_model_input(pre: ImagePreprocess, image: TensorSpec,
                                             message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        spec_with(pre, image)


def test_client_inputs() -> None:
    plain = spec_with(None)
    assert plain.client_inputs == plain.inputs
    fixed = spec_with(ImagePreprocess("image", mean=(1.0, 2.0, 3.0)))
    assert fixed.client_inputs == (TensorSpec("image", DataType.UINT8, (32, 32, 3)),)
    free = spec_with(ImagePreprocess("image", resize_shorter=36, crop=(32, 32)))
    assert free.client_input("image") == TensorSpec("image", DataType.UINT8, (-1, -1, 3))
    assert free.input("image") == IMAGE  # the model-facing view is unchanged
    nhwc = spec_with(ImagePreprocess("image", layout="NHWC", crop=(8, 8)),
                     TensorSpec("image", DataType.FP16, (8, 8, 1)))
    assert nhwc.client_inputs == (TensorSpec("image", DataType.UINT8, (-1, -1, 1)),)
    # Derived again when the spec is rebuilt (auto-completion uses dataclasses.replace).
    empty = dataclasses.replace(free, inputs=())
    assert empty.client_inputs == ()
    assert dataclasses.replace(empty, inputs=(IMAGE,)).client_inputs == free.client_inputs


def test_config_pbtxt_to_spec(tmp_path: Path) -> None:
    model_dir = tmp_path / "classifier"
    model_dir.mkdir()
    config = mc.ModelConfig()
    text_format.Parse(
        """
        max_batch_size: 4
        input [{ name: "image" data_type: TYPE_FP32 dims: [3, 32, 32] }]
        output [{ name: "scores" data_type: TYPE_FP32 dims: [10] }]
        parameters: { key: "preprocess.input" value: { string_value: "image" } }
        parameters: { key: "preprocess.resize" value: { string_value: "36" } }
        parameters: { key: "preprocess.crop" value: { string_value: "32,32" } }
        """, config)
    spec = to_spec(config, model_dir)
    assert spec.preprocess == ImagePreprocess("image", resize_shorter=36, crop=(32, 32),
                                              threads=default_threads())
    config.parameters["preprocess.crop"].string_value = "30,30"
    with pytest.raises(ModelLoadError, match="crop 30,30 differs"):
        to_spec(config, model_dir)


def request(images: Array, datatype: DataType = DataType.UINT8) -> InferRequest:
    return InferRequest(model_name="m", model_version="", id="r", inputs={"image": images},
                        input_types={"image": datatype})


def test_validate_requests_against_client_inputs() -> None:
    crop_only = spec_with(ImagePreprocess("image", crop=(32, 32)))
    validate_request(request(np.zeros((2, 40, 33, 3), np.uint8)), crop_only)
    with pytest.raises(InvalidInput, match="image of 31x40 pixels is smaller than the 32x32"):
        validate_request(request(np.zeros((1, 31, 40, 3), np.uint8)), crop_only)
    with pytest.raises(InvalidInput, match="has datatype FP32; model 'm' expects UINT8"):
        validate_request(request(np.zeros((1, 3, 32, 32), np.float32), DataType.FP32), crop_only)
    with pytest.raises(InvalidInput, match=r"expects dims \[-1, -1, 3\]"):
        validate_request(request(np.zeros((1, 40, 40, 4), np.uint8)), crop_only)
    fixed = spec_with(ImagePreprocess("image"))
    with pytest.raises(InvalidInput, match=r"expects dims \[32, 32, 3\]"):
        validate_request(request(np.zeros((1, 33, 32, 3), np.uint8)), fixed)
    resized = spec_with(ImagePreprocess("image", resize_shorter=32, crop=(32, 32)))
    validate_request(request(np.zeros((1, 1, 500, 3), np.uint8)), resized)
    unbatched = spec_with(ImagePreprocess("image", resize=(32, 32)), max_batch_size=0)
    validate_request(request(np.zeros((7, 9, 3), np.uint8)), unbatched)
