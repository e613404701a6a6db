"""server.codec.caps: a request's decoded size and its caps, from the parsed form of either
parser, before anything is decoded."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec.caps import NO_CAPS, RequestCaps, decoded_bytes
from server.codec.parsed import ParsedRequest, from_message
from server.codec.wire import NativeWireCodec, ProtobufWireCodec
from server.errors import BoundExceeded, InvalidInput

Parse = Callable[[pb.ModelInferRequest], ParsedRequest]
PARSERS: dict[str, Parse] = {
    "native": lambda m: _native.parse_infer_request(m.SerializeToString()),
    "protobuf": lambda m: from_message(pb.ModelInferRequest.FromString(m.SerializeToString())),
}


@pytest.fixture(params=sorted(PARSERS))
def parse(request: pytest.FixtureRequest) -> Parse:
    parser: Parse = PARSERS[request.param]
    return parser


def message(*inputs: tuple[str, str, list[int]], raw: list[bytes] | None = None
            ) -> pb.ModelInferRequest:
    made = pb.ModelInferRequest(model_name="m")
    for name, datatype, shape in inputs:
        made.inputs.add(name=name, datatype=datatype, shape=shape)
    made.raw_input_contents.extend(raw or [])
    return made


def test_fixed_size_inputs_count_elements_times_their_size(parse: Parse) -> None:
    sent = message(("a", "FP32", [2, 3]), ("b", "INT64", [4]), raw=[b"\0" * 24, b"\0" * 32])
    assert decoded_bytes(parse(sent), NO_CAPS) == 24 + 32


def test_typed_contents_count_what_they_decode_into(parse: Parse) -> None:
    # 1000 zeros take 1000 bytes on the wire as varints, 8000 decoded as INT64.
    sent = message(("a", "INT64", [1000]))
    sent.inputs[0].contents.int64_contents.extend([0] * 1000)
    assert decoded_bytes(parse(sent), NO_CAPS) == 8000


def test_bytes_inputs_count_their_payload(parse: Parse) -> None:
    payload = b"\x02\0\0\0ab" * 3
    sent = message(("s", "BYTES", [3]), ("a", "UINT8", [5]), raw=[payload, b"\0" * 5])
    assert decoded_bytes(parse(sent), NO_CAPS) == len(payload) + 5
    typed = message(("s", "BYTES", [2]))
    typed.inputs[0].contents.bytes_contents.extend([b"abc", b"de"])
    assert decoded_bytes(parse(typed), NO_CAPS) == typed.inputs[0].contents.ByteSize()


def test_shared_memory_inputs_count_their_window_and_take_no_raw_entry(parse: Parse) -> None:
    sent = message(("s", "BYTES", [4]), ("a", "FP32", [2]), raw=[b"\0" * 8])
    params = sent.inputs[0].parameters
    params["shared_memory_region"].string_param = "r"
    params["shared_memory_byte_size"].int64_param = 1000
    assert decoded_bytes(parse(sent), NO_CAPS) == 1000 + 8


CAPS = RequestCaps(max_tensor_elements=100, max_request_bytes=400, max_bytes_elements=10)


@pytest.mark.parametrize(("inputs", "bound", "text"), [
    ([("a", "UINT8", [1, 101])], "max_tensor_elements",
     "input 'a' has 101 elements (shape [1, 101]); the server takes at most 100 per tensor "
     "(--max-tensor-elements)"),
    ([("a", "FP64", [60])], "max_request_bytes",
     "the request's inputs decode into 480 bytes; the server takes at most 400 per request "
     "(--max-request-bytes)"),
    ([("s", "BYTES", [6]), ("t", "BYTES", [5])], "max_bytes_elements",
     "the request has 11 BYTES elements; the server takes at most 10 per request "
     "(--max-bytes-elements)"),
])
def test_caps_are_refused_naming_them(parse: Parse, inputs: list[tuple[str, str, list[int]]],
                                      bound: str, text: str) -> None:
    with pytest.raises(BoundExceeded) as refused:
        decoded_bytes(parse(message(*inputs)), CAPS)  # no contents: checked from the shapes
    assert (refused.value.bound, refused.value.message) == (bound, text)


def test_a_negative_dim_is_left_to_the_decoder(parse: Parse) -> None:
    assert decoded_bytes(parse(message(("a", "FP32", [-1, -1000]))), CAPS) == 0


@pytest.mark.parametrize("codec", [NativeWireCodec(CAPS), ProtobufWireCodec(CAPS)],
                         ids=["native", "protobuf"])
def test_the_wire_codecs_check_their_caps_and_record_the_size(
    codec: NativeWireCodec | ProtobufWireCodec,
) -> None:
    ok = message(("a", "FP32", [2, 5]), raw=[b"\0" * 40]).SerializeToString()
    assert codec.decode_request_bytes(ok, None, None).nbytes == 40
    flood = message(("s", "BYTES", [11]), raw=[b"\x01\0\0\0a" * 11]).SerializeToString()
    with pytest.raises(BoundExceeded, match="--max-bytes-elements"):
        codec.decode_request_bytes(flood, None, None)


def entries_message(inputs: int, dims: int = 0, params: int = 0) -> bytes:
    """``inputs`` empty inputs, the first with ``dims`` dims of 1 and ``params`` parameters."""
    built = pb.ModelInferRequest(model_name="m")
    for _ in range(inputs):
        built.inputs.add(name="x", datatype="FP32")
    built.inputs[0].shape.extend([1] * dims)
    for i in range(params):
        built.inputs[0].parameters[f"p{i}"].int64_param = i
    return built.SerializeToString()


@pytest.mark.parametrize("codec", [NativeWireCodec(CAPS), ProtobufWireCodec(CAPS)],
                         ids=["native", "protobuf"])
@pytest.mark.parametrize("shape", [(65537, 0, 0), (1, 65536, 0), (2, 30000, 35535)],
                         ids=["inputs", "dims", "mixed"])
def test_a_request_of_more_entries_than_the_bound_is_refused_by_both_codecs_alike(
    codec: NativeWireCodec | ProtobufWireCodec, shape: tuple[int, int, int],
) -> None:
    """65,536 entries in all (inputs, outputs, raw contents, parameters, shape dims): one more
    is refused with the bound named, before the decoder builds anything, on either path."""
    assert _native.MAX_REQUEST_ENTRIES == 65536
    with pytest.raises(BoundExceeded) as caught:
        codec.decode_request_bytes(entries_message(*shape), None, None)
    assert caught.value.bound == "max_request_entries"
    assert str(caught.value) == (
        "the request holds more than 65536 entries (inputs, outputs, raw contents, "
        "parameters, shape dims); the server takes at most 65536")


@pytest.mark.parametrize("codec", [NativeWireCodec(CAPS), ProtobufWireCodec(CAPS)],
                         ids=["native", "protobuf"])
def test_a_request_of_exactly_the_bound_of_entries_gets_past_it(
    codec: NativeWireCodec | ProtobufWireCodec,
) -> None:
    """65,535 dims and one input: 65,536 entries; what refuses it is the decoder (numpy takes
    64 dims at most), not the entry bound."""
    with pytest.raises(InvalidInput, match="input 'x' carries no data"):
        codec.decode_request_bytes(entries_message(1, 65535), None, None)
