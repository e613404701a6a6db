"""The tracing hooks around the servicer, without a server: the wrapped handlers and codec
with a stand-in servicer, their records collected as the exporter would get them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server.frontend.tracing import traced_handlers
from server.tracing.codec import TracedCodec
from server.tracing.config import parse_trace_config
from server.tracing.settings import TraceSettings
from server.tracing.trace import RequestTrace, Tracer
from server.types import InferRequest, InferResponse

PARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class _Codec:
    """Decodes b"<id>" into a request of that id; the stand-in for the wire codec."""

    def decode_request_bytes(self, data: bytes, deadline_ns: int | None,
                             shm: object) -> InferRequest:
        return InferRequest("m", "", data.decode(), {}, {})

    def encode_response_bytes(self, response: InferResponse, shm: object, stream: bool) -> bytes:
        return response.id.encode()

    def encode_stream_error_bytes(self, model_name: str, model_version: str, request_id: str,
                                  message: str) -> bytes:
        return message.encode()

    def identify(self, data: bytes) -> tuple[str, str, str]:
        return "m", "", data.decode()


class _Context:
    def __init__(self) -> None:
        self.aborted: grpc.StatusCode | None = None

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return (("traceparent", PARENT),)

    def code(self) -> grpc.StatusCode | None:
        return self.aborted

    def details(self) -> str:
        return "refused"


def traced(servicer_unary: Any, servicer_stream: Any, rate: int = 0
           ) -> tuple[dict[str, grpc.RpcMethodHandler], list[RequestTrace], TracedCodec]:
    ended: list[RequestTrace] = []
    tracer = Tracer(TraceSettings(parse_trace_config(
        ("mode=opentelemetry", "level=TIMESTAMPS", f"rate={rate}"))), ended.append)
    codec = TracedCodec(_Codec(), tracer)
    handlers = {"ModelInfer": grpc.unary_unary_rpc_method_handler(servicer_unary(codec)),
                "ModelStreamInfer": grpc.stream_stream_rpc_method_handler(
                    servicer_stream(codec))}
    return traced_handlers(handlers, tracer), ended, codec


def test_a_stream_refusal_ends_its_own_request_only() -> None:
    def stream(codec: TracedCodec) -> Any:
        async def model_stream_infer(requests: AsyncIterator[bytes], context: Any
                                     ) -> AsyncIterator[bytes]:
            """As the servicer's reader: a refusal is answered after naming the request
            from its bytes (it may not have been decoded)."""
            async for data in requests:
                if data != b"early":  # b"early" is refused before decoding, like a bound
                    codec.decode_request_bytes(data, None, None)
                if data in (b"early", b"late"):  # b"late" is refused once decoded
                    named = codec.identify(data)
                    yield codec.encode_stream_error_bytes(*named, "[RESOURCE_EXHAUSTED] full")
                # b"first" is queued and left unanswered

        return model_stream_infer

    handlers, ended, _ = traced(lambda codec: None, stream, rate=1)

    async def requests() -> AsyncIterator[bytes]:
        yield b"first"
        yield b"early"
        yield b"late"

    async def run() -> list[bytes]:
        behaviour = handlers["ModelStreamInfer"].stream_stream
        return [reply async for reply in behaviour(requests(), _Context())]

    assert len(asyncio.run(run())) == 2
    # The early refusal was not decoded, so not sampled, and did not end the first request's
    # trace; the late one ended its own; the first, never answered, ended with the stream.
    assert [(t.request_id, t.code) for t in ended] == [
        ("late", grpc.StatusCode.RESOURCE_EXHAUSTED), ("first", grpc.StatusCode.CANCELLED)]
    assert all(t.data is None for t in ended)


def test_a_unary_call_ends_its_request_with_the_calls_status() -> None:
    def unary(codec: TracedCodec) -> Any:
        async def model_infer(data: bytes, context: _Context) -> bytes:
            request = codec.decode_request_bytes(data, None, None)
            if data == b"bad":  # refused as the servicer refuses: the status set, no raise
                context.aborted = grpc.StatusCode.INVALID_ARGUMENT
                return b""
            if data == b"crash":
                raise RuntimeError("crashed")
            return codec.encode_response_bytes(
                InferResponse("m", "2", request.id, []), None, False)

        return model_infer

    handlers, ended, _ = traced(unary, lambda codec: None)
    behaviour = handlers["ModelInfer"].unary_unary
    assert asyncio.run(behaviour(b"good", _Context())) == b"good"
    assert asyncio.run(behaviour(b"bad", _Context())) == b""
    with pytest.raises(RuntimeError):
        asyncio.run(behaviour(b"crash", _Context()))
    good, bad, crash = ended
    assert (good.code, good.version, good.encode_end_ns > 0) == (grpc.StatusCode.OK, "2", True)
    assert (bad.code, bad.message) == (grpc.StatusCode.INVALID_ARGUMENT, "refused")
    assert bad.start_ns and bad.end_ns >= bad.start_ns
    assert (crash.code, crash.message) == (grpc.StatusCode.UNKNOWN, "RuntimeError('crashed')")
