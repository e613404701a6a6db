"""The byte codec of ModelInfer and ModelStreamInfer: request bytes in, response bytes out.

Two implementations of one interface, picked when a server starts by :func:`select_wire_codec`
(PEREGRINE_NATIVE=0: the protobuf runtime; otherwise the native codec, which builds no
protobuf object on the request path). Both feed the same decoding logic (codec.decode) and
write the same bytes, so a server answers bit-identically on either.

Malformed request bytes are InvalidInput ("malformed ModelInferRequest: ..."); the detail
after the colon is the parser's own (the native one names the field and the offset). A
message of more entries than codec.caps.MAX_REQUEST_ENTRIES is BoundExceeded on both paths
(the native parser stops counting there, before it holds more).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from google.protobuf.message import DecodeError

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec.caps import NO_CAPS, RequestCaps, check_entries, too_many_entries
from server.codec.decode import decode_parsed
from server.codec.encode import encode_response_native, serialize_response
from server.codec.parsed import from_message
from server.codec.shared_memory import SharedMemoryScope
from server.errors import InvalidInput
from server.packing import native_enabled
from server.types import InferRequest, InferResponse, ParsedRequest

MALFORMED = "malformed ModelInferRequest"


class WireCodec(Protocol):
    """What the inference servicer calls with the raw message bytes."""

    def decode_request_bytes(self, data: bytes, deadline_ns: int | None,
                             shm: SharedMemoryScope | None) -> InferRequest:
        """Parse and decode a serialized ModelInferRequest; raises InvalidInput (malformed
        bytes or a bad request), Unsupported or BoundExceeded (past the codec's caps, before
        anything is built), as decode.decode_parsed does."""
        ...

    def encode_response_bytes(self, response: InferResponse, shm: SharedMemoryScope | None,
                              stream: bool) -> bytes:
        """Serialize ``response`` as a ModelInferResponse, or with ``stream`` as the
        infer_response of a ModelStreamInferResponse; shared-memory outputs are written to
        their regions (see encode.encode_response)."""
        ...

    def encode_stream_error_bytes(self, model_name: str, model_version: str, request_id: str,
                                  message: str) -> bytes:
        """A failed request's answer on a stream: a ModelStreamInferResponse with
        ``error_message`` and an infer_response naming the model, version and request id."""
        ...

    def identify(self, data: bytes) -> tuple[str, str, str]:
        """The model name, version and id a request names, for answering its failure; empty
        strings when the bytes do not parse. The error path only: it parses again."""
        ...


class ParsingCodec(WireCodec, Protocol):
    """A codec that parses and decodes in two steps, so a request can be looked up in the
    response cache between them (DataPlane.cached) and decoded only on a miss."""

    def parse(self, data: bytes) -> ParsedRequest:
        """The parsed form of the bytes; InvalidInput or BoundExceeded as decoding raises."""
        ...

    def decode(self, parsed: ParsedRequest, deadline_ns: int | None,
               shm: SharedMemoryScope | None) -> InferRequest:
        """Decode what ``parse`` gave, as decode_request_bytes does."""
        ...


class ProtobufWireCodec:
    """The protobuf runtime parses and serializes (the reference path)."""

    def __init__(self, caps: RequestCaps = NO_CAPS) -> None:
        self.caps = caps

    def decode_request_bytes(self, data: bytes, deadline_ns: int | None,
                             shm: SharedMemoryScope | None) -> InferRequest:
        return self.decode(self.parse(data), deadline_ns, shm)

    def parse(self, data: bytes) -> ParsedRequest:
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError as exc:
            raise InvalidInput(f"{MALFORMED}: {exc}") from None
        check_entries(message)
        return from_message(message)

    def decode(self, parsed: ParsedRequest, deadline_ns: int | None,
               shm: SharedMemoryScope | None) -> InferRequest:
        return decode_parsed(parsed, deadline_ns, shm, self.caps)

    def encode_response_bytes(self, response: InferResponse, shm: SharedMemoryScope | None,
                              stream: bool) -> bytes:
        return serialize_response(response, shm, stream)

    def encode_stream_error_bytes(self, model_name: str, model_version: str, request_id: str,
                                  message: str) -> bytes:
        answer: bytes = pb.ModelStreamInferResponse(
            error_message=message,
            infer_response=pb.ModelInferResponse(
                model_name=model_name, model_version=model_version, id=request_id),
        ).SerializeToString()
        return answer

    def identify(self, data: bytes) -> tuple[str, str, str]:
        try:
            message = pb.ModelInferRequest.FromString(data)
        except DecodeError:
            return "", "", ""
        return message.model_name, message.model_version, message.id


class NativeWireCodec:
    """csrc/wire_codec.hpp parses into the neutral form and writes the response bytes."""

    def __init__(self, caps: RequestCaps = NO_CAPS) -> None:
        self.caps = caps

    def decode_request_bytes(self, data: bytes, deadline_ns: int | None,
                             shm: SharedMemoryScope | None) -> InferRequest:
        return self.decode(self.parse(data), deadline_ns, shm)

    def parse(self, data: bytes) -> ParsedRequest:
        try:
            parsed: ParsedRequest = _native.parse_infer_request(data)
        except _native.TooManyEntries:
            raise too_many_entries() from None
        except ValueError as exc:
            raise InvalidInput(f"{MALFORMED}: {exc}") from None
        return parsed

    def decode(self, parsed: ParsedRequest, deadline_ns: int | None,
               shm: SharedMemoryScope | None) -> InferRequest:
        return decode_parsed(parsed, deadline_ns, shm, self.caps)

    def encode_response_bytes(self, response: InferResponse, shm: SharedMemoryScope | None,
                              stream: bool) -> bytes:
        return encode_response_native(response, shm, stream)

    def encode_stream_error_bytes(self, model_name: str, model_version: str, request_id: str,
                                  message: str) -> bytes:
        return _native.encode_infer_response(model_name, model_version, request_id, {}, (),
                                             True, message)

    def identify(self, data: bytes) -> tuple[str, str, str]:
        try:
            model_name, model_version, request_id, *_ = _native.parse_infer_request(data)
        except ValueError:
            return "", "", ""
        return model_name, model_version, request_id


def select_wire_codec(environ: Mapping[str, str] | None = None,
                      caps: RequestCaps = NO_CAPS) -> ParsingCodec:
    """The codec a starting server uses: native unless PEREGRINE_NATIVE=0 (read at start,
    not import, like select_packer, so two servers in one process can run one path each)."""
    return NativeWireCodec(caps) if native_enabled(environ) else ProtobufWireCodec(caps)
