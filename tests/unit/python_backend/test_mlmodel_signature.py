"""server.backends.python.signature: an MLmodel signature as the tensors served."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.backends.python.signature import Field, SignatureError, read_signature
from server.types import DataType


def mlmodel(path: Path, inputs: object = None, outputs: object = None,
            flavors: str = "python_function: {loader_module: mlflow.sklearn}") -> Path:
    lines = [f"flavors: {{{flavors}}}"]
    if inputs is not None:  # outputs None: "null", as mlflow writes no outputs
        lines += ["signature:", f"  inputs: '{json.dumps(inputs)}'",
                  f"  outputs: '{json.dumps(outputs)}'"]
    (path / "MLmodel").write_text("\n".join(lines) + "\n")
    return path


def test_a_tensor_signature(tmp_path: Path) -> None:
    signature = read_signature(mlmodel(
        tmp_path, [{"type": "tensor", "tensor-spec": {"dtype": "float32", "shape": [-1, 4]}}],
        [{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}},
         {"type": "tensor", "name": "proba",
          "tensor-spec": {"dtype": "float64", "shape": [-1, 3]}}]))
    assert not signature.columns and signature.loader_module == "mlflow.sklearn"
    assert signature.inputs == (Field("input", DataType.FP32, (-1, 4), None),)
    assert signature.outputs == (Field("output_0", DataType.INT64, (-1,), None),
                                 Field("proba", DataType.FP64, (-1, 3), "proba"))


def test_a_column_signature(tmp_path: Path) -> None:
    signature = read_signature(mlmodel(
        tmp_path, [{"type": "double", "name": "age"}, {"type": "string", "name": "city"}],
        [{"type": "long"}]))
    assert signature.columns
    assert signature.inputs == (Field("age", DataType.FP64, (-1, 1), "age"),
                                Field("city", DataType.BYTES, (-1, 1), "city", text=True))
    assert signature.outputs == (Field("output", DataType.INT64, (-1, 1), None),)


@pytest.mark.parametrize(("inputs", "outputs", "flavors", "message"), [
    (None, None, "python_function: {}", "has no signature"),
    ([{"type": "double", "name": "x"}], None, "python_function: {}", "has no outputs"),
    ([{"type": "double", "name": "x"}], [], "python_function: {}", "has no outputs"),
    ([{"type": "double", "name": "x"}], [{"type": "long"}], "onnx: {}",
     "no python_function flavour"),
    ([{"type": "datetime", "name": "t"}], [{"type": "long"}], "python_function: {}",
     "column 't' is of type 'datetime'"),
    ([{"type": "double"}, {"type": "double"}], [{"type": "long"}], "python_function: {}",
     "unnamed input columns"),
    ([{"type": "double", "name": "x"},
      {"type": "tensor", "tensor-spec": {"dtype": "int8", "shape": [-1]}}],
     [{"type": "long"}], "python_function: {}", "mixes tensors and columns"),
    ([{"type": "tensor", "tensor-spec": {"dtype": "complex64", "shape": [-1]}}],
     [{"type": "long"}], "python_function: {}", "dtype complex64"),
])
def test_what_cannot_be_served_says_why(tmp_path: Path, inputs: object, outputs: object,
                                        flavors: str, message: str) -> None:
    with pytest.raises(SignatureError, match=message):
        read_signature(mlmodel(tmp_path, inputs, outputs, flavors))
