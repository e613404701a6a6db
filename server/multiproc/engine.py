"""The engine's side of the frontends' sockets: every call a frontend forwards runs here, on
the same method handlers a single-process server registers with gRPC (and the REST
gateway calls, through :meth:`HandlerTable.call`).

``HandlerTable`` stands in for the gRPC server when the server runs with frontends: the
composition root registers its services on it exactly as on a grpc.aio server, and each
forwarded call finds its handler the way gRPC would. ``ForwardedContext`` gives the handler
what a grpc.aio servicer context gives ours (metadata, peer, deadline, the client
certificate's properties, abort and trailing metadata), from the frontend's CALL frame.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any, NoReturn

import grpc

from server._native import ArenaReader
from server.metrics.frontends import FrontendStats
from server.multiproc.arena import (
    ARENA_MIN_BYTES,
    PLACEMENT,
    Arena,
    ArenaFull,
    take,
    take_placement,
)
from server.multiproc.frames import (
    CREDIT_BATCH,
    WINDOW,
    CallOpening,
    CallStatus,
    FrameError,
    FrameReceiver,
    FrameWriter,
    Kind,
    Metadata,
    credit,
    credit_count,
    decode_head,
)

log = logging.getLogger(__name__)
#: The frame of an answer in the arena, by the frame it stands for.
_PLACED = {Kind.ANSWER: Kind.PLACED_ANSWER, Kind.REPLY: Kind.PLACED_REPLY}

_END = object()
#: Method names a client may make the engine remember (unknown ones included) at most.
MAX_UNKNOWN_METHODS = 1024


class HandlerTable(grpc.aio.Server):  # type: ignore[misc]
    """The services the server serves, registered as on a grpc.aio server (so each helper
    that picks its asyncio flavour for a grpc.aio.Server does so here too); it listens on
    nothing. A single process's gRPC server takes them from it (:meth:`register_on`); the
    engine's links and the REST gateway find their handlers in it."""

    def __init__(self) -> None:
        self._generic: list[grpc.GenericRpcHandler] = []
        self._registered: list[tuple[str, dict[str, grpc.RpcMethodHandler]]] = []
        #: Handlers found so far, by method (a service's handlers never change once served).
        self._found: dict[str, grpc.RpcMethodHandler | None] = {}

    def add_generic_rpc_handlers(
        self, generic_rpc_handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        self._generic.extend(generic_rpc_handlers)

    def add_registered_method_handlers(self, service_name: str,
                                       method_handlers: dict[str, grpc.RpcMethodHandler]
                                       ) -> None:
        """Kept for a gRPC server (:meth:`register_on`); :meth:`find` looks among the
        generic handlers registered beside these, which find the same methods."""
        self._registered.append((service_name, method_handlers))

    def register_on(self, server: grpc.aio.Server) -> None:
        """Register every service registered here on a real gRPC server."""
        server.add_generic_rpc_handlers(tuple(self._generic))
        for service_name, method_handlers in self._registered:
            server.add_registered_method_handlers(service_name, method_handlers)

    async def call(self, opening: CallOpening) -> tuple[bytes | None, CallStatus]:
        """A unary call run here, as gRPC would run it: its reply (None when it failed) and
        its status. The REST gateway's calls in a single process."""
        context = ForwardedContext(opening)
        handler = self.find(opening.method)
        if handler is None or handler.unary_unary is None or opening.message is None:
            return None, CallStatus(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
        try:
            decode = handler.request_deserializer
            reply = await _one_reply(
                handler.unary_unary,
                opening.message if decode is None else decode(opening.message), context,
                handler.response_serializer)
        except Exception as exc:
            return None, _failed(exc, context, opening.method)
        return reply, context.status()

    def find(self, method: str) -> grpc.RpcMethodHandler | None:
        if method in self._found:
            return self._found[method]
        details = _CallDetails(method, ())
        found = next((h for g in self._generic if (h := g.service(details)) is not None), None)
        if found is not None or len(self._found) < MAX_UNKNOWN_METHODS:
            self._found[method] = found
        return found

    def add_insecure_port(self, address: str) -> int:
        raise NotImplementedError("the engine listens on nothing: its frontends do")

    def add_secure_port(self, address: str, server_credentials: grpc.ServerCredentials) -> int:
        raise NotImplementedError("the engine listens on nothing: its frontends do")

    async def start(self) -> None:
        """Nothing to start: calls arrive through EngineLink."""

    async def stop(self, grace: float | None) -> None:
        """Nothing to stop: the frontends hold the calls."""

    async def wait_for_termination(self, timeout: float | None = None) -> bool:
        return True


class _CallDetails(grpc.HandlerCallDetails):  # type: ignore[misc]
    def __init__(self, method: str, invocation_metadata: Metadata) -> None:
        self.method = method
        self.invocation_metadata = invocation_metadata


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class ForwardedContext:
    """A servicer context for a call a frontend took (the part of grpc.aio's our handlers,
    gRPC's health servicer and reflection use)."""

    def __init__(self, opening: CallOpening) -> None:
        self._opening = opening
        self._deadline = (None if opening.time_remaining is None
                          else time.monotonic() + opening.time_remaining)
        self._code: grpc.StatusCode | None = None
        self._details = ""
        self.trailing: Metadata = ()

    def invocation_metadata(self) -> Metadata:
        return self._opening.metadata

    def peer(self) -> str:
        return self._opening.peer

    def auth_context(self) -> dict[str, list[bytes]]:
        return self._opening.auth

    def time_remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def set_trailing_metadata(self, trailing_metadata: Metadata) -> None:
        self.trailing = tuple(trailing_metadata)

    async def abort(self, code: grpc.StatusCode, details: str = "",
                    trailing_metadata: Metadata = ()) -> NoReturn:
        if trailing_metadata:
            self.trailing = tuple(trailing_metadata)
        self._code, self._details = code, details
        raise _Aborted(code, details)

    def set_code(self, code: grpc.StatusCode) -> None:
        self._code = code

    def set_details(self, details: str) -> None:
        self._details = details

    def code(self) -> grpc.StatusCode | None:
        return self._code

    def details(self) -> str:
        return self._details

    def answered(self) -> bool:
        """Whether the handler set no status but OK."""
        return self._code is None or self._code is grpc.StatusCode.OK

    def status(self) -> CallStatus:
        return CallStatus(self._code or grpc.StatusCode.OK, self._details, self.trailing)


async def _one_reply(behaviour: Callable[[Any, ForwardedContext], Any], request: Any,
                     context: ForwardedContext, encode: Callable[[Any], bytes] | None
                     ) -> bytes | None:
    """A one-reply handler's reply, encoded; None when it refused the call (it set a status
    and returned: server/frontend/status.py, refuse), whose response is not sent."""
    response = behaviour(request, context)
    if inspect.isawaitable(response):
        response = await response
    if not context.answered():
        return None
    return response if encode is None else encode(response)


def _failed(exc: Exception, context: ForwardedContext, method: str) -> CallStatus:
    """How a call whose handler raised ends: its abort's status, the status it set before
    raising (gRPC's generated stubs do), else UNKNOWN as gRPC answers it."""
    if isinstance(exc, _Aborted):
        return CallStatus(exc.code, exc.details, context.trailing)
    if context.code() not in (None, grpc.StatusCode.OK):
        return context.status()
    log.exception("forwarded call failed", extra={"method": method})
    return CallStatus(grpc.StatusCode.UNKNOWN, f"Unexpected {type(exc)}: {exc}")


class _Call:
    """One forwarded call in the engine: its task and, for a streaming call, the request
    messages the frontend sent that the handler has not read and how many more replies it
    may send (a unary call needs none of that, and builds none)."""

    __slots__ = ("credit_granted", "reply_credit", "requests", "task")

    def __init__(self, handler: grpc.RpcMethodHandler | None) -> None:
        self.task: asyncio.Task[None] | None = None
        self.requests: asyncio.Queue[bytes | object] | None = \
            asyncio.Queue() if handler is not None and handler.request_streaming else None
        self.reply_credit = WINDOW
        self.credit_granted: asyncio.Event | None = None


class EngineLink:
    """One frontend's socket: its frames, as they arrive, open and feed its calls; their
    answers go back in one write per turn."""

    def __init__(self, table: HandlerTable, limit: int, on_ready: Callable[[], None],
                 on_stats: Callable[[FrontendStats], None],
                 requests: ArenaReader | None = None, answers: Arena | None = None) -> None:
        self._table = table
        #: The frontend's request arena and this link's answer arena
        #: (server/multiproc/arena.py), when the frontend has them.
        self._request_arena = requests
        self._answer_arena = answers
        self._on_ready = on_ready
        self._on_stats = on_stats
        self.receiver = FrameReceiver(limit, self._receive)
        self._frames: FrameWriter | None = None
        self._calls: dict[int, _Call] = {}

    async def serve(self, transport: asyncio.WriteTransport) -> None:
        """Until the frontend closes its socket (or dies); then its calls are cancelled."""
        receiver = self.receiver
        self._frames = FrameWriter(transport)
        try:
            error = await receiver.closed
            if error is not None:
                log.error("frontend sent a bad frame: closing its socket",
                          extra={"error": str(error)})
        finally:
            calls = [c.task for c in self._calls.values() if c.task is not None]
            for task in calls:
                task.cancel()
            await asyncio.gather(*calls, return_exceptions=True)
            transport.close()
            # The link and its receiver hold each other: without this the arenas stayed
            # mapped until the next garbage collection (a message still viewed keeps one).
            self._request_arena = self._answer_arena = None

    def _receive(self, kind: int, number: int, body: bytes) -> None:
        if kind == Kind.CALL:
            if number in self._calls:
                raise FrameError(f"call {number} opened twice")
            opening = CallOpening.decode(body, self._take)
            handler = self._table.find(opening.method)
            call = self._calls[number] = _Call(handler)
            call.task = asyncio.get_running_loop().create_task(
                self._run(number, call, opening, handler))
            return
        if kind == Kind.STATS:
            try:
                self._on_stats(FrontendStats.from_tuple(decode_head(body, 6)))
            except ValueError as exc:
                raise FrameError(f"a STATS frame that does not parse: {exc}") from None
            return
        if kind == Kind.READY:
            self._on_ready()
            return
        call_or_none = self._calls.get(number)
        if call_or_none is None:
            if kind == Kind.PLACED:  # the call has ended: its message's block goes free
                take_placement(self._request_arena, body)
            return  # the call has ended; a late frame of it means nothing
        if kind == Kind.CANCEL:
            if call_or_none.task is not None:
                call_or_none.task.cancel()
        elif kind == Kind.CREDIT:
            call_or_none.reply_credit += credit_count(body)
            if call_or_none.credit_granted is not None:
                call_or_none.credit_granted.set()
        elif kind in (Kind.MESSAGE, Kind.PLACED, Kind.HALF_CLOSE):
            requests = call_or_none.requests
            if requests is None:
                raise FrameError(f"call {number} takes one request, and got {Kind(kind).name}")
            if kind == Kind.HALF_CLOSE:
                requests.put_nowait(_END)
            elif requests.qsize() >= WINDOW:
                raise FrameError(f"call {number}: more messages than its window")
            elif kind == Kind.MESSAGE:
                requests.put_nowait(body)
            else:
                requests.put_nowait(take_placement(self._request_arena, body))
        else:
            raise FrameError(f"a frontend does not send {Kind(kind).name}")

    def _take(self, offset: int, length: int) -> memoryview:
        return take(self._request_arena, offset, length)

    def _send(self, kind: Kind, number: int, body: bytes = b"") -> None:
        assert self._frames is not None
        self._frames.send(kind, number, body)

    def _send_answer(self, kind: Kind, number: int, message: bytes) -> None:
        """An ANSWER or REPLY; a large one through the answer arena when it has room."""
        answers = self._answer_arena
        if answers is not None and len(message) >= ARENA_MIN_BYTES:
            with contextlib.suppress(ArenaFull):  # then over the socket
                self._send(_PLACED[kind], number, PLACEMENT.pack(*answers.place(message)))
                return
        self._send(kind, number, message)

    async def _requests(self, number: int, call: _Call,
                        decode: Callable[[Any], Any] | None) -> AsyncIterator[Any]:
        requests = call.requests
        assert requests is not None
        consumed = 0
        while True:
            message = await requests.get()
            if message is _END:
                return
            consumed += 1
            if consumed == CREDIT_BATCH:
                self._send(Kind.CREDIT, number, credit(consumed))
                consumed = 0
            assert isinstance(message, bytes | memoryview)
            yield message if decode is None else decode(message)

    async def _reply(self, number: int, call: _Call, message: bytes) -> None:
        while call.reply_credit <= 0:
            if call.credit_granted is None:
                call.credit_granted = asyncio.Event()
            call.credit_granted.clear()
            await call.credit_granted.wait()
        call.reply_credit -= 1
        self._send_answer(Kind.REPLY, number, message)

    async def _run(self, number: int, call: _Call, opening: CallOpening,
                   handler: grpc.RpcMethodHandler | None) -> None:
        context = ForwardedContext(opening)
        try:
            if handler is None:
                status = CallStatus(grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            else:
                reply = await self._handle(number, call, handler, opening, context)
                if reply is not None:
                    self._calls.pop(number, None)
                    if not context.trailing:  # the common case: one frame, no status built
                        self._send_answer(Kind.ANSWER, number, reply)
                        return
                    self._send_answer(Kind.REPLY, number, reply)
                status = context.status()
        except asyncio.CancelledError:
            self._calls.pop(number, None)
            return
        except Exception as exc:
            status = _failed(exc, context, opening.method)
        self._calls.pop(number, None)
        self._send(Kind.STATUS, number, status.encode())

    async def _handle(self, number: int, call: _Call, handler: grpc.RpcMethodHandler,
                      opening: CallOpening, context: ForwardedContext) -> bytes | None:
        """Run the call's handler; a streaming answer's replies are sent as they come, a
        unary answer is returned."""
        decode = handler.request_deserializer
        encode = handler.response_serializer
        request: Any
        if handler.request_streaming:
            request = self._requests(number, call, decode)
        else:
            if opening.message is None:
                raise FrameError(f"{opening.method} takes one request and the call has none")
            request = opening.message if decode is None else decode(opening.message)
        if not handler.response_streaming:
            behaviour = handler.stream_unary if handler.request_streaming \
                else handler.unary_unary
            return await _one_reply(behaviour, request, context, encode)
        behaviour = handler.stream_stream if handler.request_streaming \
            else handler.unary_stream
        async for response in behaviour(request, context):
            await self._reply(number, call, response if encode is None else encode(response))
        return None
