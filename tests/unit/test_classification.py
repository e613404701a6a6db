"""The classification extension's answer (server/classification.py) against a plain oracle,
and the label file (server/repository/labels.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from server.classification import classify
from server.errors import ModelLoadError
from server.repository.labels import split_labels, with_labels
from server.spec import ModelSpec, TensorSpec
from server.types import DataType, OutputTensor


def oracle(row: npt.NDArray[Any], k: int, labels: list[bytes]) -> list[bytes]:
    """Triton's rule written plainly: largest first (equal values lowest index first), the
    value as C's %f for floats, the label when the file has a non-empty line for it."""
    ranked = sorted(range(row.size), key=lambda i: (-float(row[i]), i))[:k]
    out = []
    for i in ranked:
        value = f"{float(row[i]):f}" if row.dtype.kind == "f" else str(int(row[i]))
        text = f"{value}:{i}".encode()
        out.append(text + b":" + labels[i] if i < len(labels) and labels[i] else text)
    return out


@pytest.mark.parametrize("dtype", ["float32", "float64", "int32", "uint8", "int64"])
def test_batched_rows_are_classified_one_by_one(dtype: str) -> None:
    rng = np.random.default_rng(3)
    data = rng.integers(0, 50, (3, 2, 5)).astype(dtype)
    if dtype.startswith("float"):
        data = data / np.asarray(7, dtype=dtype)
    data[1, 0, :2] = data[1, 1, 3]  # ties
    labels = [b"zero", b"one", b"", b"three"]  # shorter than a row; one empty line
    tensor = OutputTensor("OUT", DataType.from_wire({"float32": "FP32", "float64": "FP64",
                                                     "int32": "INT32", "uint8": "UINT8",
                                                     "int64": "INT64"}[dtype]), data)
    for k in (1, 4, 10):
        got = classify(tensor, k, labels, batched=True)
        assert got.datatype is DataType.BYTES and got.shape == (3, min(k, 10))
        for r in range(3):
            assert list(got.data[r]) == oracle(data[r].reshape(-1), k, labels)


def test_an_unbatched_output_is_one_row() -> None:
    data = np.array([[0.25, 0.5], [0.125, 0.75]], dtype=np.float32)
    got = classify(OutputTensor("OUT", DataType.FP32, data), 3, [], batched=False)
    assert got.shape == (3,)
    assert list(got.data) == [b"0.750000:3", b"0.500000:1", b"0.250000:0"]


def test_label_file_lines_and_confinement(tmp_path: Path) -> None:
    assert split_labels(b"a\nb\r\n\nd\n") == (b"a", b"b\r", b"", b"d")
    assert split_labels(b"a\nb") == (b"a", b"b")
    (tmp_path / "labels.txt").write_bytes(b"cat\ndog\n")
    spec = ModelSpec("m", "onnxruntime_onnx", "onnxruntime", 8, (),
                     (TensorSpec("OUT", DataType.FP32, (2,), label_filename="labels.txt"),))
    assert with_labels(spec, tmp_path).labels == {"OUT": (b"cat", b"dog")}
    for bad, needle in (("../etc/passwd", "relative path"), ("missing.txt", "cannot be read"),
                        (".", "not a file")):
        outside = ModelSpec("m", "onnxruntime_onnx", "onnxruntime", 8, (),
                            (TensorSpec("OUT", DataType.FP32, (2,), label_filename=bad),))
        with pytest.raises(ModelLoadError, match=needle):
            with_labels(outside, tmp_path)
