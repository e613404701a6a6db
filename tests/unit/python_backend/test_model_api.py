"""Our triton_python_backend_utils: the names and behaviour a Triton model.py relies on."""

from __future__ import annotations

import json

import numpy as np
import pytest

from server.backends.python import triton_python_backend_utils as pb_utils


def test_tensors_take_their_datatype_from_numpy() -> None:
    assert pb_utils.Tensor("x", np.zeros(2, np.float32)).triton_dtype() == 11
    text = pb_utils.Tensor("t", np.array(["a", "bc"]))  # fixed-width text: variable bytes
    assert text.wire_datatype == "BYTES" and text.as_numpy().dtype == object
    bf16 = pb_utils.Tensor("b", np.zeros(2, np.uint16), triton_dtype=14)
    assert bf16.wire_datatype == "BF16"
    with pytest.raises(pb_utils.TritonModelException, match="complex64"):
        pb_utils.Tensor("c", np.zeros(2, np.complex64))
    assert pb_utils.numpy_to_triton_type(np.bool_) == 1
    assert pb_utils.numpy_to_triton_type(np.object_) == 13
    assert pb_utils.triton_to_numpy_type(12) is np.float64
    assert pb_utils.triton_string_to_numpy("TYPE_INT8") is np.int8


def test_requests_and_responses() -> None:
    x = pb_utils.Tensor("X", np.ones(3))
    request = pb_utils.InferenceRequest(requested_output_names=["Y"], inputs=[x],
                                        request_id="r1", parameters={"k": 1})
    assert pb_utils.get_input_tensor_by_name(request, "X") is x
    assert pb_utils.get_input_tensor_by_name(request, "Z") is None
    assert json.loads(request.parameters()) == {"k": 1}
    assert request.request_id() == "r1" and request.requested_output_names() == ["Y"]
    error = pb_utils.TritonError("no")
    assert error.code() == pb_utils.TritonError.INTERNAL
    response = pb_utils.InferenceResponse(error=error)
    assert response.has_error() and response.error() is error
    with pytest.raises(pb_utils.TritonModelException, match="must be a list"):
        pb_utils.InferenceResponse(x)  # type: ignore[arg-type]


@pytest.mark.parametrize("call", [
    lambda r: r.exec(), lambda r: r.get_response_sender(), lambda r: r.set_release_flags(2),
    lambda _: pb_utils.load_model("m"), lambda _: pb_utils.MetricFamily("m", "d", 0),
])
def test_what_is_not_supported_says_so(call: object) -> None:
    request = pb_utils.InferenceRequest(model_name="other")
    with pytest.raises(pb_utils.TritonModelException, match="not supported by Peregrine"):
        call(request)  # type: ignore[operator]


def test_model_config_helpers() -> None:
    config = {"input": [{"name": "A", "data_type": "TYPE_FP32", "dims": [2]}], "output": []}
    assert pb_utils.get_input_config_by_name(config, "A")["dims"] == [2]
    assert pb_utils.get_output_config_by_name(config, "A") is None
    completed = pb_utils.ModelConfig(json.dumps(config))
    completed.add_input({"name": "A", "data_type": "TYPE_FP32", "dims": [2]})  # the same: ok
    completed.add_output({"name": "B", "data_type": "TYPE_INT8", "dims": [1]})
    completed.set_max_batch_size(4)
    completed.set_dynamic_batching()
    assert completed.as_dict()["max_batch_size"] == 4
    assert [t["name"] for t in completed.as_dict()["output"]] == ["B"]
    with pytest.raises(pb_utils.TritonModelException, match="already declared"):
        completed.add_input({"name": "A", "data_type": "TYPE_FP16", "dims": [2]})
    with pytest.raises(pb_utils.TritonModelException, match="decoupled"):
        completed.set_model_transaction_policy({"decoupled": True})


def test_bytes_tensors_serialize_as_triton_lays_them_out() -> None:
    value = np.array([b"ab", "c", b""], dtype=object)
    flat = pb_utils.serialize_byte_tensor(value)
    assert flat is not None
    assert flat.tobytes() == b"\x02\x00\x00\x00ab\x01\x00\x00\x00c\x00\x00\x00\x00"
    assert pb_utils.deserialize_bytes_tensor(flat.tobytes()).tolist() == [b"ab", b"c", b""]
