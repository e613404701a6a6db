"""The bytes on the wire for the load path.

The load generator serialises its ModelInferRequest once and sends those bytes through a
generic ``grpc.aio`` channel with identity (de)serialisers: no protobuf work per unary call,
which measured cheapest per request (see bench/README.md). Streaming requests differ only in
their ``id`` (field 3), which is appended to the pre-serialised bytes: protobuf parsers keep
the last value of a repeated scalar field, so ``payload + id field`` parses as the request
with that id. Stream responses are parsed (we need their id and error message).
"""

from __future__ import annotations

from collections.abc import Sequence

import grpc
from google.protobuf.message import DecodeError
from tritonclient.grpc import service_pb2 as pb

from bench.loadgen.inputs import InputTensor

SERVICE = "/inference.GRPCInferenceService/"
INFER_METHOD = SERVICE + "ModelInfer"
STREAM_METHOD = SERVICE + "ModelStreamInfer"

_ID_TAG = b"\x1a"  # field 3 (id), wire type 2 (length-delimited)


def infer_request_bytes(
    model: str, version: str, tensors: Sequence[InputTensor], request_id: str = ""
) -> bytes:
    request = pb.ModelInferRequest(model_name=model, model_version=version, id=request_id)
    for tensor in tensors:
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=tensor.shape)
        request.raw_input_contents.append(tensor.raw)
    return bytes(request.SerializeToString())


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def id_suffix(request_id: str) -> bytes:
    """The encoded ``id`` field to append to a serialised request."""
    data = request_id.encode()
    return _ID_TAG + _varint(len(data)) + data


STREAM_FORMATS = ("triton", "plain")


def parse_stream_response(data: bytes, stream_format: str = "triton") -> tuple[str, str]:
    """(request id, error message or '') of one stream answer.

    ``triton``: a ModelStreamInferResponse (Triton's and Peregrine's stream). ``plain``: a
    bare ModelInferResponse, which MLServer streams instead (its proto differs there).
    """
    try:
        if stream_format == "plain":
            return pb.ModelInferResponse.FromString(data).id, ""
        response = pb.ModelStreamInferResponse.FromString(data)
    except DecodeError:
        return "", f"[BAD_RESPONSE] not a {stream_format} stream response"
    return response.infer_response.id, response.error_message


def error_code_of_message(message: str) -> str:
    """A stream error's status name: servers that follow Triton write '[CODE] text'."""
    if message.startswith("[") and "]" in message:
        code = message[1:message.index("]")]
        if code.isupper() and code.replace("_", "").isalpha():
            return code
    return "STREAM_ERROR"


def channel_options(max_message_bytes: int = 64 * 1024 * 1024) -> list[tuple[str, int]]:
    return [
        ("grpc.max_receive_message_length", max_message_bytes),
        ("grpc.max_send_message_length", max_message_bytes),
        # A channel of its own per generator: never share a subchannel with another one.
        ("grpc.use_local_subchannel_pool", 1),
    ]


def unary_callable(channel: grpc.aio.Channel) -> grpc.aio.UnaryUnaryMultiCallable:
    return channel.unary_unary(INFER_METHOD, request_serializer=None,
                               response_deserializer=None)


def stream_callable(channel: grpc.aio.Channel) -> grpc.aio.StreamStreamMultiCallable:
    return channel.stream_stream(STREAM_METHOD, request_serializer=None,
                                 response_deserializer=None)
