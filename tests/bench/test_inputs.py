"""Request data: random tensors from metadata, files, and the bytes the wire carries."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tritonclient.grpc import service_pb2 as pb

from bench.loadgen.inputs import (
    DATATYPES,
    InputError,
    TensorMeta,
    load_input_file,
    random_inputs,
    resolve_shape,
    serialize_bytes,
)
from bench.loadgen.wire import error_code_of_message, id_suffix, infer_request_bytes


@pytest.mark.parametrize("datatype", DATATYPES)
def test_random_tensor_of_every_datatype(datatype: str) -> None:
    [tensor] = random_inputs([TensorMeta("x", datatype, (-1, 3))], batch_size=2)
    assert tensor.shape == (2, 3)
    assert tensor.datatype == datatype
    if datatype == "BYTES":
        assert tensor.raw[:4] == (8).to_bytes(4, "little")  # 8-letter words
    else:
        width = {"BOOL": 1, "BF16": 2}.get(datatype) or np.dtype(
            {"FP16": "f2", "FP32": "f4", "FP64": "f8"}.get(datatype, datatype.lower())).itemsize
        assert len(tensor.raw) == 6 * width


def test_resolve_shape() -> None:
    meta = TensorMeta("x", "FP32", (-1, -1, 4))
    assert resolve_shape(meta, 8) == (8, 1, 4)
    assert resolve_shape(meta, 8, dynamic_dim=5) == (8, 5, 4)
    assert resolve_shape(meta, 2, override=(7, 4)) == (2, 7, 4)
    assert resolve_shape(TensorMeta("y", "FP32", (4,)), 8) == (4,)  # no batch dimension
    assert resolve_shape(TensorMeta("z", "FP32", (-1, 16)), 3, batched=False) == (1, 16)
    with pytest.raises(InputError, match="differs"):
        resolve_shape(meta, 1, override=(7, 5))
    with pytest.raises(InputError, match="dims"):
        resolve_shape(meta, 1, override=(7,))


def test_unknown_shape_name_is_an_error() -> None:
    with pytest.raises(InputError, match="unknown inputs"):
        random_inputs([TensorMeta("x", "FP32", (-1,))], shapes={"y": (2,)})


def test_bytes_serialization() -> None:
    raw = serialize_bytes(np.array([b"ab", "c"], dtype=object))
    assert raw == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c"


def test_npy_npz_json_files(tmp_path: Path) -> None:
    data = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.save(tmp_path / "x.npy", data)
    np.savez(tmp_path / "x.npz", a=data, b=np.array([[1], [2]], dtype=np.int64))
    metas = [TensorMeta("a", "FP32", (-1, 3))]
    [from_npy] = load_input_file(tmp_path / "x.npy", metas)
    assert (from_npy.name, from_npy.datatype, from_npy.shape) == ("a", "FP32", (2, 3))
    assert np.frombuffer(from_npy.raw, "<f4").tolist() == [0, 1, 2, 3, 4, 5]
    by_name = {t.name: t for t in load_input_file(tmp_path / "x.npz")}
    assert by_name["a"].datatype == "FP64" and by_name["b"].datatype == "INT64"
    (tmp_path / "x.json").write_text(json.dumps({"inputs": [
        {"name": "a", "datatype": "INT32", "shape": [1, 2], "data": [[5, 6]]},
        {"name": "t", "datatype": "BYTES", "shape": [1], "data": ["hi"]},
    ]}))
    a, t = load_input_file(tmp_path / "x.json")
    assert np.frombuffer(a.raw, "<i4").tolist() == [5, 6]
    assert t.raw == b"\x02\x00\x00\x00hi"


def test_bad_files(tmp_path: Path) -> None:
    np.savez(tmp_path / "x.npz", nope=np.zeros(2))
    with pytest.raises(InputError, match="no input named nope"):
        load_input_file(tmp_path / "x.npz", [TensorMeta("a", "FP32", (-1,))])
    np.save(tmp_path / "x.npy", np.zeros(2))
    with pytest.raises(InputError, match="--input-name"):
        load_input_file(tmp_path / "x.npy")
    (tmp_path / "x.json").write_text('{"inputs": [{"name": "a", "datatype": "FP32", '
                                     '"shape": [3], "data": [1, 2]}]}')
    with pytest.raises(InputError, match="do not fill"):
        load_input_file(tmp_path / "x.json")
    with pytest.raises(InputError, match=r"\.npy, \.npz or \.json"):
        load_input_file(tmp_path / "x.csv")


def test_appended_id_overrides_the_serialized_one() -> None:
    tensors = random_inputs([TensorMeta("x", "FP32", (-1, 4))])
    payload = infer_request_bytes("m", "2", tensors, request_id="first")
    request = pb.ModelInferRequest.FromString(payload + id_suffix("x" * 300))
    assert request.id == "x" * 300  # a length that needs a two-byte varint
    assert request.model_name == "m" and request.model_version == "2"
    assert request.raw_input_contents[0] == tensors[0].raw


def test_stream_error_codes() -> None:
    assert error_code_of_message("[INVALID_ARGUMENT] bad shape") == "INVALID_ARGUMENT"
    assert error_code_of_message("something broke") == "STREAM_ERROR"
