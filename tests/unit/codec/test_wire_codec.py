"""The native wire codec (csrc/wire_codec.hpp) against the protobuf runtime, its oracle.

Requests: random valid ModelInferRequest bytes (every datatype, raw and typed contents,
shared-memory and every kind of parameter, unknown fields of every wire type, packed and
unpacked shapes, repeated singular fields and map keys) and corruptions of them must give
the same parse and the same decoded request, or the same error, on both paths. Responses:
the native encoder writes the bytes the protobuf runtime serializes.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pytest
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec.encode import encode_response
from server.codec.parsed import ParsedRequest, from_message
from server.codec.wire import (
    MALFORMED,
    NativeWireCodec,
    ProtobufWireCodec,
    WireCodec,
    select_wire_codec,
)
from server.errors import InvalidInput, PeregrineError
from server.types import DataType, InferRequest, InferResponse, OutputTensor, ParamValue

NATIVE = NativeWireCodec()
PROTOBUF = ProtobufWireCodec()
CASES = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

INT64 = st.integers(-(2**63), 2**63 - 1)
UINT64 = st.integers(0, 2**64 - 1)
DOUBLES = st.floats(allow_nan=True, allow_infinity=True)
SHORT_TEXT = st.text(max_size=6)
NAMES = st.sampled_from(["a", "b", "x", "é", ""])
SHM_KEYS = ["shared_memory_region", "shared_memory_byte_size", "shared_memory_offset"]
KEYS = st.sampled_from(["priority", "timeout", "sequence_id", "classification", "k", "ключ",
                        *SHM_KEYS]) | SHORT_TEXT
DATATYPES = st.sampled_from([dt.wire for dt in DataType] + ["FP8", ""])


# -- encoding helpers: bytes the generator appends to what protobuf serialized ------------------

def varint(value: int) -> bytes:
    value &= 2**64 - 1
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def tag(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def delimited(field: int, payload: bytes) -> bytes:
    return tag(field, 2) + varint(len(payload)) + payload


@st.composite
def unknown_fields(draw: st.DrawFn, depth: int = 0) -> bytes:
    """Fields numbered 9 and up (unknown in every message of the request), every wire type,
    groups nested and matched."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        field = draw(st.integers(9, 2**29 - 1))
        kind = draw(st.sampled_from([0, 1, 2, 3, 5] if depth < 3 else [0, 1, 2, 5]))
        if kind == 0:
            out += tag(field, 0) + varint(draw(UINT64))
        elif kind == 1:
            out += tag(field, 1) + draw(st.binary(min_size=8, max_size=8))
        elif kind == 5:
            out += tag(field, 5) + draw(st.binary(min_size=4, max_size=4))
        elif kind == 2:
            out += delimited(field, draw(st.binary(max_size=8)))
        else:
            out += tag(field, 3) + draw(unknown_fields(depth + 1)) + tag(field, 4)
    return out


# -- request generation -------------------------------------------------------------------------

@st.composite
def parameter(draw: st.DrawFn) -> pb.InferParameter:
    kind = draw(st.sampled_from(["bool", "int64", "string", "double", "uint64", "none"]))
    if kind == "bool":
        return pb.InferParameter(bool_param=draw(st.booleans()))
    if kind == "int64":
        return pb.InferParameter(int64_param=draw(INT64 | st.integers(-2, 40)))
    if kind == "string":
        return pb.InferParameter(string_param=draw(SHORT_TEXT | st.just("r")))
    if kind == "double":
        return pb.InferParameter(double_param=draw(DOUBLES))
    if kind == "uint64":
        return pb.InferParameter(uint64_param=draw(UINT64 | st.integers(2**63, 2**64 - 1)))
    return pb.InferParameter()


@st.composite
def parameter_entries(draw: st.DrawFn, field: int) -> bytes:
    """Map entries of field ``field``, sometimes with a repeated key, a missing key or value,
    the value repeated (merged), or unknown fields inside."""
    out = b""
    for _ in range(draw(st.integers(0, 3))):
        key = draw(KEYS)
        value = draw(parameter()).SerializeToString()
        entry = b""
        if draw(st.integers(0, 9)) > 0:
            entry += delimited(1, key.encode())
        if draw(st.integers(0, 9)) > 0:
            entry += delimited(2, value + draw(unknown_fields()))
        if draw(st.integers(0, 9)) == 0:
            entry += delimited(2, draw(parameter()).SerializeToString())
        entry += draw(unknown_fields())
        out += delimited(field, entry)
    return out


def typed_contents(datatype: str, count: int, draw: st.DrawFn) -> pb.InferTensorContents:
    contents = pb.InferTensorContents()
    if datatype == "BOOL":
        contents.bool_contents.extend(draw(st.lists(st.booleans(), min_size=count,
                                                    max_size=count)))
    elif datatype in ("INT8", "INT16", "INT32"):
        contents.int_contents.extend(draw(st.lists(st.integers(-(2**31), 2**31 - 1)
                                                   | st.integers(-200, 200),
                                                   min_size=count, max_size=count)))
    elif datatype in ("UINT8", "UINT16", "UINT32"):
        contents.uint_contents.extend(draw(st.lists(st.integers(0, 2**32 - 1)
                                                    | st.integers(0, 300),
                                                    min_size=count, max_size=count)))
    elif datatype == "INT64":
        contents.int64_contents.extend(draw(st.lists(INT64, min_size=count, max_size=count)))
    elif datatype == "UINT64":
        contents.uint64_contents.extend(draw(st.lists(UINT64, min_size=count, max_size=count)))
    elif datatype == "FP32":
        contents.fp32_contents.extend(draw(st.lists(st.floats(width=32), min_size=count,
                                                    max_size=count)))
    elif datatype == "FP64":
        contents.fp64_contents.extend(draw(st.lists(DOUBLES, min_size=count, max_size=count)))
    else:
        contents.bytes_contents.extend(draw(st.lists(st.binary(max_size=5), min_size=count,
                                                     max_size=count)))
    return contents


def raw_content(datatype: str, count: int, draw: st.DrawFn) -> bytes:
    if datatype == "BYTES":
        return _native.encode_bytes(draw(st.lists(st.binary(max_size=5), min_size=count,
                                                  max_size=count)))
    if datatype == "BOOL":
        return bytes(draw(st.lists(st.sampled_from([0, 1, 1, 2]), min_size=count,
                                   max_size=count)))
    size = DataType.from_wire(datatype).itemsize if datatype in DataType.__members__ else 4
    return draw(st.binary(min_size=count * size, max_size=count * size))


@st.composite
def infer_request(draw: st.DrawFn) -> bytes:
    """Serialized ModelInferRequest: protobuf writes the scalar fields, the generator appends
    inputs, outputs and the odd repetition or unknown field in wire form."""
    raw_mode = draw(st.booleans())
    head = pb.ModelInferRequest(model_name=draw(SHORT_TEXT), model_version=draw(SHORT_TEXT),
                                id=draw(SHORT_TEXT))
    out = head.SerializeToString() + draw(parameter_entries(4))
    raws: list[bytes] = []
    for _ in range(draw(st.integers(0, 3))):
        datatype = draw(DATATYPES)
        shape = draw(st.lists(st.integers(1, 3) | st.integers(-2, 0), min_size=0, max_size=3)
                     | st.lists(INT64, max_size=2))
        count = math.prod(shape) if shape and all(0 <= d <= 8 for d in shape) else 1
        tensor = pb.ModelInferRequest.InferInputTensor(name=draw(NAMES), datatype=datatype)
        body = tensor.SerializeToString()
        if draw(st.booleans()):
            body += delimited(3, b"".join(varint(d) for d in shape))  # packed
        else:
            body += b"".join(tag(3, 0) + varint(d) for d in shape)  # unpacked
        body += draw(parameter_entries(4))
        known = datatype in DataType.__members__
        if raw_mode and known:
            raws.append(raw_content(datatype, count, draw))
        if draw(st.integers(0, 4)) == 0 or (not raw_mode and known and datatype != "FP16"):
            if known and datatype not in ("FP16", "BF16"):
                contents = typed_contents(datatype, count, draw).SerializeToString()
            else:
                contents = b""
            contents += draw(unknown_fields())
            split = draw(st.integers(0, 1))  # a repeated submessage is merged
            if split and len(contents) > 0:
                body += delimited(5, b"") + delimited(5, contents)
            else:
                body += delimited(5, contents)
        body += draw(unknown_fields())
        out += delimited(5, body)
    for _ in range(draw(st.integers(0, 2))):
        body = delimited(1, draw(NAMES).encode()) + draw(parameter_entries(2))
        out += delimited(6, body + draw(unknown_fields()))
    if draw(st.integers(0, 5)) == 0:
        raws.append(draw(st.binary(max_size=8)))
    for raw in raws:
        out += delimited(7, raw)
    out += draw(unknown_fields())
    if draw(st.integers(0, 5)) == 0:  # a singular field again: the last value wins
        out += pb.ModelInferRequest(id=draw(SHORT_TEXT), model_name="again").SerializeToString()
    return out


# -- comparison -----------------------------------------------------------------------------------

def _value_form(value: Any) -> tuple[str, str]:
    """A value compared by type and repr: NaN equals NaN, -0.0 differs from 0.0."""
    return type(value).__name__, repr(value)


def _param_form(params: Any) -> dict[str, tuple[Any, ...]]:
    """Parsed parameters as dicts (protobuf's map order is its hash table's)."""
    return {key: (member, *_value_form(value)) for key, (member, value) in params.items()}


def parsed_form(parsed: ParsedRequest) -> tuple[Any, ...]:
    name, version, request_id, params, inputs, outputs, raw = parsed
    return (
        name, version, request_id, _param_form(params),
        [(n, d, tuple(s), _param_form(p), None if c is None else (
            c if isinstance(c, pb.InferTensorContents) else pb.InferTensorContents.FromString(c)))
         for n, d, s, p, c in inputs],
        [(n, _param_form(p)) for n, p in outputs],
        [bytes(r) for r in raw],
    )


def _array_form(array: np.ndarray[Any, Any]) -> tuple[Any, ...]:
    content = array.tolist() if array.dtype == object else array.tobytes()
    return array.dtype.str, array.shape, array.flags.writeable, content


def request_form(request: InferRequest) -> tuple[Any, ...]:
    return (
        request.model_name, request.model_version, request.id,
        [(name, _array_form(array)) for name, array in request.inputs.items()],
        request.input_types, request.requested_outputs,
        {key: _value_form(value) for key, value in request.parameters.items()},
        request.priority, request.timeout_us, request.deadline_ns,
    )


def outcome(codec: WireCodec, data: bytes) -> tuple[Any, ...]:
    try:
        return ("ok", request_form(codec.decode_request_bytes(data, 123, None)))
    except PeregrineError as exc:
        message = MALFORMED if exc.message.startswith(MALFORMED + ": ") else exc.message
        return ("error", type(exc).__name__, message)


def check_request(data: bytes) -> None:
    try:
        message = pb.ModelInferRequest.FromString(data)
    except DecodeError:
        with pytest.raises(ValueError):
            _native.parse_infer_request(data)
        assert outcome(NATIVE, data) == ("error", "InvalidInput", MALFORMED)
        assert outcome(PROTOBUF, data) == ("error", "InvalidInput", MALFORMED)
        return
    assert parsed_form(_native.parse_infer_request(data)) == parsed_form(from_message(message))
    assert outcome(NATIVE, data) == outcome(PROTOBUF, data)


@CASES
@given(infer_request())
def test_random_requests_parse_and_decode_alike(data: bytes) -> None:
    check_request(data)


@CASES
@given(infer_request(), st.data())
def test_corrupted_requests_fail_alike_or_match(data: bytes, choices: st.DataObject) -> None:
    kind = choices.draw(st.sampled_from(["truncate", "flip", "insert", "overwrite"]))
    assume(data)
    at = choices.draw(st.integers(0, len(data) - 1))
    if kind == "truncate":
        corrupted = data[:at]
    elif kind == "flip":
        corrupted = data[:at] + bytes([data[at] ^ choices.draw(st.integers(1, 255))]) + \
            data[at + 1:]
    elif kind == "insert":
        corrupted = data[:at] + choices.draw(st.binary(min_size=1, max_size=4)) + data[at:]
    else:
        corrupted = data[:at] + choices.draw(st.binary(min_size=1, max_size=6)) + \
            data[at + 6:]
    check_request(corrupted)


@CASES
@given(st.binary(max_size=64))
def test_random_bytes_fail_alike_or_match(data: bytes) -> None:
    check_request(data)


def unknown_group(body: bytes, field: int = 100) -> bytes:
    return tag(field, 3) + body + tag(field, 4)


@pytest.mark.parametrize("data", [
    unknown_group(tag(0, 0) + b"\x01"),  # upb takes field number 0 inside an unknown group
    unknown_group(tag(0, 1) + bytes(8)),
    unknown_group(tag(0, 2) + b"\x01a"),
    unknown_group(tag(0, 5) + bytes(4)),
    unknown_group(tag(0, 3) + tag(0, 4)),
    unknown_group(unknown_group(tag(0, 0) + b"\x01", field=7)),
    delimited(5, unknown_group(tag(0, 0) + b"\x01")),  # inside an input
    tag(100, 3) + tag(0, 4),  # ... but not as the end of another group
    tag(0, 3) + tag(0, 4),  # nor outside one
    unknown_group(tag(0, 6)),  # nor with wire type 6
], ids=lambda data: data.hex())
def test_field_number_zero_is_judged_as_protobuf_judges_it(data: bytes) -> None:
    check_request(data)


def groups(count: int) -> bytes:
    return tag(20, 3) * count + tag(20, 4) * count


@pytest.mark.parametrize("depth", [1, 96, 97, 98, 99, 100, 101, 150])
@pytest.mark.parametrize("where", ["top", "input", "parameter", "contents", "output"])
def test_nesting_limit_matches_protobuf(depth: int, where: str) -> None:
    nested = groups(depth)
    if where == "top":
        data = nested
    elif where == "input":
        data = delimited(5, nested)
    elif where == "parameter":
        data = delimited(5, delimited(4, delimited(2, nested)))
    elif where == "contents":
        data = delimited(5, delimited(5, nested))
    else:
        data = delimited(6, delimited(2, delimited(1, b"k") + nested))
    check_request(data)


@pytest.mark.parametrize("data", [
    b"\x0a\x02\xff\xfe",  # invalid UTF-8 in model_name
    b"\x0a\x03\xed\xa0\x80",  # an encoded surrogate
    b"\x0a\x02\xc0\x80",  # overlong
    b"\x0a\x04\xf4\x90\x80\x80",  # above U+10FFFF
    delimited(4, delimited(1, b"\xff")),  # in a map key
    delimited(4, delimited(2, delimited(3, b"\xff"))),  # in string_param
    delimited(5, delimited(2, b"\xe2\x82")),  # truncated, in a datatype
    delimited(9, b"\xff"),  # in an unknown field: not checked
    b"\x0a\x04\xf0\x9f\x98\x80",  # a valid 4-byte form
    b"\x00\x00", b"\x02\x00", b"\x0c", b"\x0b\x14", b"\x0e", b"\x0f", b"\x0b",
    b"\x08" + b"\xff" * 10 + b"\x01",  # an 11-byte varint
    b"\x98\x01" + b"\xff" * 9 + b"\x7f",  # 10 bytes, high bits dropped
    b"\x88\x80\x80\x80\x80\x00\x01",  # a 6-byte tag
    b"\x88\x80\x80\x80\x70\x01",  # a tag above 32 bits
    b"\xf8\xff\xff\xff\x0f\x01",  # the largest field number
    b"\x3a\xff\xff\xff\xff\x0f",  # a length far past the end
    delimited(5, delimited(5, tag(6, 2) + varint(3) + b"\0\0\0")),  # packed float, 3 bytes
    delimited(5, delimited(5, tag(7, 2) + varint(8) + b"\0" * 8)),
    delimited(5, delimited(5, tag(2, 2) + varint(1) + b"\x80")),  # packed varint cut short
    delimited(5, delimited(5, tag(6, 0) + varint(1))),  # float as a varint: unknown
    delimited(5, delimited(3, b"\x80")),  # packed shape cut short
    delimited(5, tag(1, 0) + varint(5)),  # a string as a varint: unknown
], ids=repr)
def test_edge_cases_match_protobuf(data: bytes) -> None:
    check_request(data)


def test_raw_contents_are_read_only_views_of_the_request() -> None:
    values = np.arange(64, dtype=np.float32)
    message = pb.ModelInferRequest(model_name="m", raw_input_contents=[values.tobytes()])
    message.inputs.add(name="x", datatype="FP32", shape=[1, 64])
    for data in (message.SerializeToString(), bytearray(message.SerializeToString())):
        request = NATIVE.decode_request_bytes(data, None, None)
        array = request.inputs["x"]
        assert np.array_equal(array, values.reshape(1, 64)) and not array.flags.writeable
        assert np.shares_memory(array, np.frombuffer(data, dtype=np.uint8))


def test_malformed_bytes_name_the_field_and_offset() -> None:
    with pytest.raises(InvalidInput, match=r"malformed ModelInferRequest: field 1: length 5 "
                                           r"runs past the end \(2 bytes remain\) at offset 1"):
        NATIVE.decode_request_bytes(b"\x0a\x05ab", None, None)
    with pytest.raises(InvalidInput, match=r"^malformed ModelInferRequest: "):
        PROTOBUF.decode_request_bytes(b"\x0a\x05ab", None, None)
    with pytest.raises(TypeError):
        _native.parse_infer_request("not a buffer")  # type: ignore[arg-type]


def test_select_wire_codec_reads_the_switch() -> None:
    assert isinstance(select_wire_codec({}), NativeWireCodec)
    assert isinstance(select_wire_codec({"PEREGRINE_NATIVE": "1"}), NativeWireCodec)
    for off in ("0", "false", "off"):
        assert isinstance(select_wire_codec({"PEREGRINE_NATIVE": off}), ProtobufWireCodec)


# -- responses ------------------------------------------------------------------------------------

PARAM_VALUES: st.SearchStrategy[ParamValue] = (
    st.booleans() | INT64 | UINT64 | DOUBLES | SHORT_TEXT
)


@st.composite
def output_tensor(draw: st.DrawFn) -> OutputTensor:
    datatype = draw(st.sampled_from(list(DataType)))
    shape = tuple(draw(st.lists(st.integers(0, 3), max_size=3)))
    count = math.prod(shape)
    name = draw(NAMES)
    if datatype is DataType.BYTES:
        items = np.empty(count, dtype=object)
        items[:] = draw(st.lists(st.binary(max_size=4), min_size=count, max_size=count))
        return OutputTensor(name, datatype, items.reshape(shape))
    raw = draw(st.binary(min_size=count * datatype.itemsize, max_size=count * datatype.itemsize))
    if datatype is DataType.BOOL:
        raw = bytes(b & 1 for b in raw)
    if draw(st.booleans()):
        return OutputTensor(name, datatype, raw=raw, shape=shape)
    array = np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)
    if draw(st.booleans()) and datatype is not DataType.BOOL:  # another dtype: cast on encode
        array = array.astype(np.float64 if datatype.numpy_dtype.kind == "f" else np.int64)
    if draw(st.booleans()):
        array = np.asfortranarray(array)
    return OutputTensor(name, datatype, array)


@st.composite
def infer_response(draw: st.DrawFn) -> InferResponse:
    return InferResponse(
        draw(SHORT_TEXT), draw(SHORT_TEXT), draw(SHORT_TEXT),
        draw(st.lists(output_tensor(), max_size=3)),
        draw(st.dictionaries(SHORT_TEXT, PARAM_VALUES, max_size=3)),
    )


@CASES
@given(infer_response())
def test_native_response_bytes_are_protobufs(response: InferResponse) -> None:
    message = encode_response(response)
    unary = NATIVE.encode_response_bytes(response, None, False)
    stream = NATIVE.encode_response_bytes(response, None, True)
    assert unary == PROTOBUF.encode_response_bytes(response, None, False)
    assert stream == PROTOBUF.encode_response_bytes(response, None, True)
    assert pb.ModelInferResponse.FromString(unary) == message
    assert pb.ModelStreamInferResponse.FromString(stream) == pb.ModelStreamInferResponse(
        infer_response=message)
    if len(response.parameters) <= 1:  # one map entry: no order to differ in
        assert unary == message.SerializeToString()
        assert stream == pb.ModelStreamInferResponse(infer_response=message).SerializeToString()
    else:  # the dict's order on both paths
        keys = list(response.parameters)
        assert [unary.index(b"\n" + varint(len(k.encode())) + k.encode() + b"\x12")
                for k in keys] == sorted(unary.index(b"\n" + varint(len(k.encode()))
                                                     + k.encode() + b"\x12") for k in keys)


@CASES
@given(SHORT_TEXT, SHORT_TEXT, SHORT_TEXT, st.text(max_size=40))
def test_stream_errors_are_protobufs(name: str, version: str, request_id: str,
                                     text: str) -> None:
    expected = pb.ModelStreamInferResponse(
        error_message=text,
        infer_response=pb.ModelInferResponse(model_name=name, model_version=version,
                                             id=request_id)).SerializeToString()
    assert NATIVE.encode_stream_error_bytes(name, version, request_id, text) == expected
    assert PROTOBUF.encode_stream_error_bytes(name, version, request_id, text) == expected


@pytest.mark.parametrize(("value", "error"), [
    (2**64, ValueError), (-(2**63) - 1, ValueError), ([1], TypeError),
])
def test_unencodable_parameters_fail_alike(value: Any, error: type[Exception]) -> None:
    response = InferResponse("m", "", "", [], {"k": value})
    for codec in (NATIVE, PROTOBUF):
        with pytest.raises(error):
            codec.encode_response_bytes(response, None, False)


def test_large_outputs_encode_without_the_gil_alike() -> None:
    big = np.arange(1 << 16, dtype=np.float32).reshape(256, 256)
    response = InferResponse("m", "1", "r", [OutputTensor("y", DataType.FP32, big)],
                             {"a": 1.5})
    data = NATIVE.encode_response_bytes(response, None, False)
    assert data == encode_response(response).SerializeToString()
    assert struct.unpack_from("<f", data, len(data) - 4)[0] == big[-1, -1]


# -- hostile bytes: protobuf-shaped noise and every kind of buffer ------------------------------

WIRE_TYPES = st.sampled_from([2] * 8 + [0, 0, 1, 5, 3])
LEAVES = st.text(max_size=6).map(str.encode)
DEFECTS = st.sampled_from(["wire type", "varint", "fixed", "length", "group", "leaf"])


@st.composite
def wire_noise(draw: st.DrawFn, depth: int = 0, defects: frozenset[str] | None = None) -> bytes:
    """Protobuf-shaped bytes: the request's own field numbers at every level with any wire
    type, and noise nested in length-delimited fields and groups, so that it reaches the
    parsers of inputs, outputs, parameters, map entries and contents. Half the examples are
    well-formed; the others carry defects drawn once per example: wire types 4, 6 and 7,
    varints too long or cut short, fixed values cut short, lengths that lie (short, past the
    end, beyond 2**31), unmatched groups and binary leaves."""
    if defects is None:
        defects = frozenset(draw(st.lists(DEFECTS, max_size=2)))
    out = b""
    for _ in range(draw(st.integers(0, 4))):
        field = draw(st.integers(1, 8) | st.sampled_from([9, 2**29 - 1]))
        wire_type = draw(WIRE_TYPES | st.sampled_from([4, 6, 7]) if "wire type" in defects
                         else WIRE_TYPES)
        if wire_type == 0:
            value = varint(draw(st.integers(0, 2**64 - 1)))
            if "varint" in defects:
                value = draw(st.sampled_from([value, b"\xff" * 10 + b"\x01", b"\x80"]))
            out += tag(field, 0) + value
        elif wire_type in (1, 5):
            width = 8 if wire_type == 1 else 4
            short = width - 1 if "fixed" in defects else width
            out += tag(field, wire_type) + draw(st.binary(min_size=short, max_size=width))
        elif wire_type == 2:
            nested = depth < 4 and draw(st.integers(0, 3)) > 0
            leaves = LEAVES | st.binary(max_size=8) if "leaf" in defects else LEAVES
            payload = draw(wire_noise(depth + 1, defects)) if nested else draw(leaves)
            length = len(payload)
            if "length" in defects:
                length = draw(st.sampled_from([length, max(0, length - 1), length + 1,
                                               2**31 - 1, 2**31, 2**32, 2**64 - 1]))
            out += tag(field, 2) + varint(length) + payload
        elif wire_type == 3 and depth < 4:
            end = tag(field, 4)
            if "group" in defects:
                end = draw(st.sampled_from([end, tag(field + 1, 4), b""]))
            out += tag(field, 3) + draw(wire_noise(depth + 1, defects)) + end
        else:
            out += tag(field, wire_type)
    return out


@CASES
@given(wire_noise())
def test_protobuf_shaped_noise_fails_alike_or_matches(data: bytes) -> None:
    check_request(data)


def buffers_of(data: bytes) -> list[Any]:
    """``data`` as every kind of contiguous buffer a caller may hand the parser."""
    padded = b"##" + data + b"#"
    forms: list[Any] = [bytearray(data), memoryview(padded)[2:2 + len(data)],
                        np.frombuffer(data, dtype=np.uint8)]
    if data and len(data) % 4 == 0:
        forms.append(np.frombuffer(data, dtype="<u4").reshape(1, -1))
    return forms


@CASES
@given(infer_request() | wire_noise())
def test_every_buffer_kind_parses_as_bytes_do(data: bytes) -> None:
    try:
        want: Any = parsed_form(_native.parse_infer_request(data))
    except ValueError as exc:
        want = str(exc)
    for buffer in buffers_of(data):
        try:
            got: Any = parsed_form(_native.parse_infer_request(buffer))
        except ValueError as exc:
            got = str(exc)
        assert got == want, type(buffer)
    if len(data) > 1:
        with pytest.raises(TypeError, match="C-contiguous"):
            _native.parse_infer_request(memoryview(data * 2)[::2])
