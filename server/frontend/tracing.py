"""Tracing at the call: the inference handlers wrapped once, at start, when tracing is on.

Each ModelInfer or ModelStreamInfer call reads its caller's trace context (``traceparent``,
``tracestate``) from its metadata once (server/tracing/trace.py). A unary call's request is
sampled here, and its span ends here with the call's status (a refusal before decoding
included); a stream's requests are sampled one by one as the (wrapped) codec decodes them,
end as their answers are written, and those still unanswered when the stream ends are ended
CANCELLED. Without tracing nothing here
is built: the handlers are registered unwrapped.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc

from server.tracing.trace import Tracer

UNARY, STREAM = "ModelInfer", "ModelStreamInfer"


def traced_handlers(handlers: dict[str, grpc.RpcMethodHandler], tracer: Tracer
                    ) -> dict[str, grpc.RpcMethodHandler]:
    """``handlers`` (GRPCInferenceService's) with ModelInfer and ModelStreamInfer traced."""
    wrapped = dict(handlers)
    unary, stream = handlers[UNARY], handlers[STREAM]
    wrapped[UNARY] = grpc.unary_unary_rpc_method_handler(
        _unary(tracer, unary.unary_unary), unary.request_deserializer,
        unary.response_serializer)
    wrapped[STREAM] = grpc.stream_stream_rpc_method_handler(
        _stream(tracer, stream.stream_stream), stream.request_deserializer,
        stream.response_serializer)
    return wrapped


def _set_status(context: grpc.aio.ServicerContext) -> tuple[grpc.StatusCode, str] | None:
    """The status the handler set, when not OK (a refused call's: status.refuse)."""
    code = context.code()
    if isinstance(code, grpc.StatusCode) and code is not grpc.StatusCode.OK:
        return code, context.details() or ""
    return None


def _status(exc: BaseException, context: grpc.aio.ServicerContext
            ) -> tuple[grpc.StatusCode, str]:
    """The status a call that raised ``exc`` ends with."""
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED, "the call was cancelled"
    return _set_status(context) or (grpc.StatusCode.UNKNOWN, repr(exc))


def _unary(tracer: Tracer, behaviour: Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]
           ) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
    async def traced(request: Any, context: grpc.aio.ServicerContext) -> Any:
        trace = tracer.enter_unary(context.invocation_metadata(), UNARY)
        if trace is None:
            return await behaviour(request, context)
        try:
            reply = await behaviour(request, context)
        except BaseException as exc:
            trace.finish(*_status(exc, context))
            raise
        trace.finish(*(_set_status(context) or (grpc.StatusCode.OK, "")))
        return reply

    return traced


def _stream(tracer: Tracer,
            behaviour: Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]
            ) -> Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[Any]]:
    async def traced(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        call = tracer.enter_stream(context.invocation_metadata(), STREAM)
        try:
            async for reply in behaviour(requests, context):
                yield reply
        finally:
            assert call.live is not None
            for trace in list(call.live):
                trace.finish(grpc.StatusCode.CANCELLED,
                             "the stream ended before the request was answered")

    return traced

