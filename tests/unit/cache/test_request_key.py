"""server.cache.key: what makes two requests share an answer, and what keeps them apart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server._pb import grpc_service_pb2 as pb
from server.cache.key import key_inputs, request_key
from server.codec.decode import decode_request
from server.types import DataType, InferRequest, ParamValue


def request(
    data: Any = (1.0, 2.0, 3.0, 4.0), *, name: str = "INPUT0", dtype: DataType = DataType.FP32,
    shape: tuple[int, ...] = (1, 4), outputs: tuple[str, ...] | None = None,
    parameters: dict[str, ParamValue] | None = None, request_id: str = "a",
) -> InferRequest:
    array = np.asarray(data, dtype=dtype.numpy_dtype).reshape(shape)
    return InferRequest("m", "1", request_id, {name: array}, {name: dtype},
                        requested_outputs=outputs, parameters=dict(parameters or {}))


def key(req: InferRequest, owner: int = 1) -> object:
    return request_key(owner, req)


def test_the_id_and_the_scheduling_parameters_are_not_part_of_the_key() -> None:
    assert key(request(request_id="a")) == key(request(
        request_id="b", parameters={"priority": 2, "timeout": 500}))


@pytest.mark.parametrize("other", [
    request((1.0, 2.0, 3.0, 5.0)),                       # one value
    request(shape=(2, 2)),                                # the same bytes, another shape
    request(name="INPUT1"),                               # another input
    request(outputs=("OUTPUT0",)),                        # outputs named
    request(parameters={"customer": "x"}),                # a parameter that may matter
    request(np.array([1.0, 2.0, 3.0, 4.0], np.float32).view(np.uint32), dtype=DataType.UINT32),
], ids=["value", "shape", "name", "outputs", "parameter", "datatype"])
def test_anything_that_may_change_the_answer_changes_the_key(other: InferRequest) -> None:
    assert key(request()) != key(other)


def test_the_same_bytes_as_bf16_and_uint16_are_different_requests() -> None:
    words = (1, 2, 3, 4)
    assert key(request(words, dtype=DataType.UINT16)) != key(request(words, dtype=DataType.BF16))


def test_requested_outputs_in_another_order_are_another_answer() -> None:
    assert key(request(outputs=("A", "B"))) != key(request(outputs=("B", "A")))


def test_parameter_values_keep_their_wire_type() -> None:
    assert key(request(parameters={"flag": True})) != key(request(parameters={"flag": 1}))
    assert key(request(parameters={"a": 1, "b": "x"})) == key(
        request(parameters={"b": "x", "a": 1}))


def test_each_share_has_keys_of_its_own() -> None:
    assert key(request(), owner=1) != key(request(), owner=2)


def test_bytes_inputs_are_told_apart_by_their_element_boundaries() -> None:
    def strings(*items: bytes) -> InferRequest:
        array = np.empty(len(items), dtype=object)
        array[:] = list(items)
        return InferRequest("m", "1", "", {"T": array.reshape(1, -1)}, {"T": DataType.BYTES})

    assert key(strings(b"ab", b"c")) != key(strings(b"a", b"bc"))
    assert key(strings(b"ab", b"c")) == key(strings(b"ab", b"c"))


def test_raw_and_typed_contents_of_the_same_values_share_a_key() -> None:
    values = [1.5, -2.0, 0.25, 8.0]
    raw = pb.ModelInferRequest(model_name="m", id="raw",
                               raw_input_contents=[np.array(values, np.float32).tobytes()])
    raw.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    typed = pb.ModelInferRequest(model_name="m", id="typed")
    typed.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4]).contents.fp32_contents[:] = \
        values
    assert key(decode_request(raw, None)) == key(decode_request(typed, None))


def test_a_key_counts_its_inputs() -> None:
    two = InferRequest("m", "1", "", {"A": np.zeros(2, np.int8), "B": np.ones(3, np.int8)},
                       {"A": DataType.INT8, "B": DataType.INT8})
    assert key_inputs(request_key(1, two)) == 2
