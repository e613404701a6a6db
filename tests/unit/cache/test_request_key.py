"""server.cache.key: what makes two requests share an answer, and what keeps them apart."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from server._pb import grpc_service_pb2 as pb
from server.cache.key import key_inputs, parsed_key, request_key
from server.codec.decode import decode_request
from server.codec.wire import NativeWireCodec, ProtobufWireCodec
from server.types import DataType, InferRequest, ParamValue

NATIVE = NativeWireCodec()
PROTOBUF = ProtobufWireCodec()


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


# -- the key taken from the parsed form (a hit answered before decoding) ------------------------


def message(*tensors: tuple[str, str, list[int], bytes], **fields: Any) -> pb.ModelInferRequest:
    built = pb.ModelInferRequest(model_name="m", id="x", **fields)
    for name, datatype, shape, data in tensors:
        built.inputs.add(name=name, datatype=datatype, shape=shape)
        built.raw_input_contents.append(data)
    return built


FLOATS = np.arange(4, dtype=np.float32).tobytes()
PARSERS = {"native": NATIVE.parse, "protobuf": PROTOBUF.parse}


def sample_messages() -> list[pb.ModelInferRequest]:
    with_outputs = message(("A", "FP32", [1, 4], FLOATS))
    with_outputs.outputs.add(name="OUT1")
    with_outputs.outputs.add(name="OUT0")
    with_parameters = message(("A", "INT8", [2, 2], b"\x01\x02\x03\x04"))
    with_parameters.parameters["flag"].bool_param = True
    with_parameters.parameters["n"].int64_param = 7
    with_parameters.parameters["big"].uint64_param = 2**63
    with_parameters.parameters["s"].string_param = "x"
    with_parameters.parameters["f"].double_param = 0.5
    return [
        message(("A", "FP32", [1, 4], FLOATS)),
        message(("A", "FP32", [1, 4], FLOATS), ("B", "BOOL", [1, 3], b"\x01\x00\x01")),
        message(("A", "BF16", [2], b"\x01\x02\x03\x04"), model_version="3"),
        with_outputs,
        with_parameters,
    ]


@pytest.mark.parametrize("parser", sorted(PARSERS))
@pytest.mark.parametrize("index", range(len(sample_messages())))
def test_the_parsed_form_gives_the_key_decoding_gives(parser: str, index: int) -> None:
    data = sample_messages()[index].SerializeToString()
    parsed = PARSERS[parser](data)
    assert parsed_key(1, parsed) is not None
    assert parsed_key(1, parsed) == request_key(1, NATIVE.decode(parsed, None, None))


def _shm_input() -> pb.ModelInferRequest:
    built = pb.ModelInferRequest(model_name="m")
    tensor = built.inputs.add(name="A", datatype="FP32", shape=[1, 4])
    tensor.parameters["shared_memory_region"].string_param = "r"
    tensor.parameters["shared_memory_byte_size"].int64_param = 16
    return built


def _typed_input() -> pb.ModelInferRequest:
    built = pb.ModelInferRequest(model_name="m")
    built.inputs.add(name="A", datatype="FP32", shape=[1, 2]).contents.fp32_contents[:] = [1, 2]
    return built


def _with_output_parameter() -> pb.ModelInferRequest:
    built = message(("A", "FP32", [1, 4], FLOATS))
    built.outputs.add(name="OUT").parameters["classification"].int64_param = 2
    return built


def _with_scheduling_parameter() -> pb.ModelInferRequest:
    built = message(("A", "FP32", [1, 4], FLOATS))
    built.parameters["priority"].string_param = "high"  # decoding refuses it; not in the key
    return built


@pytest.mark.parametrize("built", [
    message(("A", "BYTES", [1], b"\x01\x00\x00\x00a")),              # element boundaries
    message(("A", "FP32", [1, 4], FLOATS[:-4])),                     # too few bytes
    _shm_input(),
    _typed_input(),
    _with_output_parameter(),
    _with_scheduling_parameter(),
], ids=["bytes", "short", "shared-memory", "typed", "output-parameter",
        "scheduling-parameter"])
def test_requests_the_parsed_form_cannot_vouch_for_get_no_key(
        built: pb.ModelInferRequest) -> None:
    assert parsed_key(1, NATIVE.parse(built.SerializeToString())) is None


def test_inputs_whose_bytes_are_split_otherwise_are_not_keyed_as_the_valid_request() -> None:
    """The same concatenated bytes, split at another place between two inputs: the valid
    request has a key, the shifted one none (decoding refuses it)."""
    valid = message(("A", "FP32", [1, 2], FLOATS[:8]), ("B", "FP32", [1, 2], FLOATS[8:]))
    shifted = message(("A", "FP32", [1, 2], FLOATS[:4]), ("B", "FP32", [1, 2], FLOATS[4:]))
    assert parsed_key(1, NATIVE.parse(valid.SerializeToString())) is not None
    assert parsed_key(1, NATIVE.parse(shifted.SerializeToString())) is None
