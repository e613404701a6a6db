"""Typed errors -> gRPC status: the one place where that mapping happens."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import grpc

from server.errors import PeregrineError, RateLimited, correlation_id

log = logging.getLogger(__name__)

Req = TypeVar("Req")
Resp = TypeVar("Resp")
#: Trailing metadata key of the delay before a refused call may be retried, in ms.
RETRY_PUSHBACK = "grpc-retry-pushback-ms"
Handler = Callable[[Any, Req, grpc.aio.ServicerContext], Awaitable[Resp]]


def status_of(exc: BaseException, rpc: str, request_id: str = "") -> tuple[grpc.StatusCode, str]:
    """The status and message to answer ``exc`` with. A typed error answers its own message
    (written for clients); anything else answers a generic message with a correlation id,
    and the log line with that id holds the exception. INTERNAL errors are logged.

    ``exc`` loses its traceback here, once logged. An error that came from a request's future
    holds, through its traceback, the frame that took it from the future, which holds the
    future, which holds the error: a cycle that kept the request (its message, its inputs)
    in memory until the garbage collector next ran."""
    if isinstance(exc, PeregrineError):
        exc.__traceback__ = None
        if exc.code is grpc.StatusCode.INTERNAL:
            log.error("request failed", extra={"rpc": rpc, "request_id": request_id,
                                               "error": exc.message})
        return exc.code, exc.message
    correlation = correlation_id()
    log.error("request failed", extra={"rpc": rpc, "request_id": request_id,
                                       "correlation_id": correlation, "error": repr(exc)},
              exc_info=exc)
    exc.__traceback__ = None
    return grpc.StatusCode.INTERNAL, f"internal error (correlation id {correlation})"


def refuse(context: grpc.aio.ServicerContext, exc: Exception, rpc: str,
           request_id: str = "") -> None:
    """Set ``exc``'s status (see status_of) as the call's; the handler returns next, and gRPC
    sends that status and drops whatever the handler returned.

    Not ``context.abort``: gRPC keeps the exception an abort raises on the call's state, and
    that exception's traceback holds the handler's frames, the call's context (so the call's
    state) and the request among their locals. The cycle is freed only when the garbage
    collector next runs, so every refused request's message (up to the message limit) stayed
    in memory until then: a flood of large refused requests grew the server by gigabytes.
    """
    code, message = status_of(exc, rpc, request_id)
    if isinstance(exc, RateLimited):
        # gRPC's own retry-pushback key: clients with retries configured wait this long.
        context.set_trailing_metadata(((RETRY_PUSHBACK, str(exc.retry_after_ms)),))
    context.set_code(code)
    context.set_details(message)


def mapped(handler: Handler[Req, Resp]) -> Handler[Req, Resp | None]:
    """Answer typed errors with their status and unexpected ones with INTERNAL, logged (the
    wrapped handler then returns None, which gRPC does not send)."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Req, context: grpc.aio.ServicerContext
                      ) -> Resp | None:
        try:
            return await handler(self, request, context)
        except Exception as exc:
            refuse(context, exc, handler.__name__, getattr(request, "id", ""))
            return None

    return wrapper
