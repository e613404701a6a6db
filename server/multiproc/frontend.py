"""A frontend process (``peregrine serve --frontends N``): a grpc.aio server on the server's
port, shared with the other frontends (SO_REUSEPORT), that forwards every call to the engine
over its socket and relays the answers; with --allow-http, the REST server on the HTTP port
(shared likewise), whose requests go to the engine as the gRPC calls they translate to.

The frontend takes gRPC's per-call work (HTTP/2, TLS, the calls' own Python) off the engine:
that is most of a small request's cost on one core. Everything else — authentication, bounds,
decoding, models — runs in the engine, once for the whole server.

Run by the engine (server/multiproc/supervisor.py) as
``python -m server.multiproc.frontend --engine SOCKET --settings JSON``; it exits 0 after
SIGTERM (calls in flight finish within the exit timeout) and 1 when the engine goes away.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import signal
import socket
import sys
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from prometheus_client import CollectorRegistry

from server._native import ArenaReader
from server.grpc_options import server_options
from server.logs import configure_logging
from server.metrics.frontends import STATS_INTERVAL_S, FrontendStats
from server.metrics.loop_lag import LoopLag
from server.multiproc.arena import (
    PLACEMENT,
    Arena,
    ArenaFull,
    placed_request,
    receive_hello,
    send_hello,
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
    credit,
    credit_count,
    encode_head,
)
from server.rest.server import start_http
from server.security import tls
from server.services import served_services
from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: Settings a frontend needs (the rest is the engine's).
FRONTEND_SETTINGS = (
    "host", "grpc_port", "grpc_max_message_bytes", "grpc_max_pending_calls", "grpc_use_ssl",
    "allow_http", "http_port", "http_address", "http_max_connections",
    "grpc_server_cert", "grpc_server_key", "grpc_root_cert", "grpc_use_ssl_mutual",
    "uvloop", "exit_timeout_secs", "log_level", "log_format", "frontend_arena_bytes",
)
ENGINE_GONE = "the server's engine is not running"
ANSWERED = CallStatus(grpc.StatusCode.OK)
#: Room for a frame's header and call opening beside the largest message.
FRAME_OVERHEAD = 1 << 20
#: How long the engine may take to answer a frontend's hello.
HELLO_TIMEOUT_S = 60.0


def frame_limit(settings: ServerSettings) -> int:
    return settings.grpc_max_message_bytes + FRAME_OVERHEAD


def settings_json(settings: ServerSettings) -> str:
    values = {name: getattr(settings, name) for name in FRONTEND_SETTINGS}
    return json.dumps({k: str(v) if isinstance(v, Path) else v for k, v in values.items()})


def settings_from_json(text: str) -> ServerSettings:
    values: dict[str, Any] = json.loads(text)
    for name in ("grpc_server_cert", "grpc_server_key", "grpc_root_cert"):
        if values.get(name) is not None:
            values[name] = Path(values[name])
    # The repository is the engine's: any path passes the settings' checks.
    return ServerSettings(model_repository=Path("."), metrics_port=0, **values)


class EngineGone(Exception):
    """The engine's socket closed: no call can be answered any more."""


class _Forwarded:
    """One call forwarded to the engine: its answer (a unary reply) or its replies as they
    come (a streamed one), then its status."""

    __slots__ = ("credit_granted", "done", "replies", "reply", "request_credit", "status")

    def __init__(self, streamed: bool) -> None:
        #: A streamed answer's messages, then None when the status has come.
        self.replies: asyncio.Queue[bytes | None] | None = \
            asyncio.Queue() if streamed else None
        #: A unary answer's message, once it came.
        self.reply: bytes | None = None
        #: Done when a unary call's status has come.
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.status: CallStatus | None = None
        self.request_credit = WINDOW
        self.credit_granted: asyncio.Event | None = None

    def answer(self, message: bytes) -> None:
        if self.replies is None:
            self.reply = message
        else:
            self.replies.put_nowait(message)

    def end(self, status: CallStatus) -> None:
        self.status = status
        if self.replies is not None:
            self.replies.put_nowait(None)
        if not self.done.done():
            self.done.set_result(None)
        if self.credit_granted is not None:
            self.credit_granted.set()


class EngineClient:
    """The frontend's end of its socket: opens calls, sends their messages, routes the
    engine's frames to them as they arrive."""

    def __init__(self, limit: int, tls: bool, arena: Arena | None = None,
                 answers: ArenaReader | None = None) -> None:
        self.receiver = FrameReceiver(limit, self._receive)
        #: Whether calls come over TLS (only then do they carry a client certificate).
        self.tls = tls
        #: Where large inference requests go, and the engine's arena their large answers
        #: come in (server/multiproc/arena.py), when there are arenas.
        self.arena = arena
        self._answers = answers
        self._transport: asyncio.WriteTransport | None = None
        self._frames: FrameWriter | None = None
        self._calls: dict[int, _Forwarded] = {}
        self._next = 1
        self.gone = asyncio.Event()

    def attach(self, transport: asyncio.WriteTransport) -> None:
        """The socket's transport, once connected: frames go out through it."""
        self._transport = transport
        self._frames = FrameWriter(transport)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()

    def send(self, kind: Kind, number: int, body: bytes = b"") -> None:
        if self.gone.is_set():
            raise EngineGone
        assert self._frames is not None
        self._frames.send(kind, number, body)

    def open(self, opening: CallOpening, streamed: bool) -> tuple[int, _Forwarded]:
        """Open the call in the engine; ArenaFull when its message finds no room in the
        arena (nothing is sent then), EngineGone when the engine has gone (a block placed
        then is never freed, and needs no freeing: the frontend exits with its engine)."""
        message = opening.message
        placed = self.arena.place(message) if self.arena is not None and message is not None \
            and placed_request(opening.method, message) else None
        number = self._next
        self._next += 1
        self.send(Kind.CALL, number, opening.encode(placed))
        call = self._calls[number] = _Forwarded(streamed)
        return number, call

    def close_call(self, number: int) -> None:
        """The call ended here; a CANCEL tells the engine when it had not ended there."""
        call = self._calls.pop(number, None)
        if call is not None and call.status is None and not self.gone.is_set():
            self.send(Kind.CANCEL, number)

    async def message(self, path: str, number: int, call: _Forwarded, data: bytes) -> None:
        """One more request message of a client-streaming call, within its window."""
        while call.request_credit <= 0:
            if call.credit_granted is None:
                call.credit_granted = asyncio.Event()
            call.credit_granted.clear()
            await call.credit_granted.wait()
        call.request_credit -= 1
        if self.arena is not None and placed_request(path, data):
            with contextlib.suppress(ArenaFull):  # then over the socket: see arena.py
                self.send(Kind.PLACED, number, PLACEMENT.pack(*self.arena.place(data)))
                return
        self.send(Kind.MESSAGE, number, data)

    def _receive(self, kind: int, number: int, body: bytes) -> None:
        if kind in (Kind.PLACED_ANSWER, Kind.PLACED_REPLY):
            # Copied out for gRPC at once (its block freed), even for a call that has gone.
            body = bytes(take_placement(self._answers, body))
        call = self._calls.get(number)
        if call is None:
            return
        if kind in (Kind.ANSWER, Kind.PLACED_ANSWER):
            call.answer(body)
            call.end(ANSWERED)
        elif kind in (Kind.REPLY, Kind.PLACED_REPLY):
            call.answer(body)
        elif kind == Kind.STATUS:
            call.end(CallStatus.decode(body))
        elif kind == Kind.CREDIT:
            call.request_credit += credit_count(body)
            if call.credit_granted is not None:
                call.credit_granted.set()
        else:
            raise FrameError(f"the engine does not send {Kind(kind).name}")

    async def run(self) -> None:
        """Until the engine's socket closes; then every open call ends UNAVAILABLE."""
        try:
            error = await self.receiver.closed
            if error is None:
                log.error("the engine closed its socket")
            else:
                log.error("the engine sent a bad frame", extra={"error": str(error)})
        finally:
            self.gone.set()
            gone = CallStatus(grpc.StatusCode.UNAVAILABLE, ENGINE_GONE)
            for call in self._calls.values():
                if call.status is None:
                    call.end(gone)


def _open(client: EngineClient, method: str, context: grpc.aio.ServicerContext,
          message: bytes | None, streamed: bool) -> tuple[int, _Forwarded] | None:
    """Forward the call's opening; None, the call's status set to UNAVAILABLE, when the
    engine is gone. (Statuses are set, never raised with context.abort: see
    server/frontend/status.py, refuse.)"""
    auth = context.auth_context() if client.tls else None
    opening = CallOpening(
        method=method, time_remaining=context.time_remaining(), peer=str(context.peer()),
        metadata=tuple((m.key, m.value) for m in context.invocation_metadata() or ()),
        auth={str(k): [bytes(v) for v in values] for k, values in auth.items()} if auth else {},
        message=message)
    try:
        return client.open(opening, streamed)
    except EngineGone:
        context.set_code(grpc.StatusCode.UNAVAILABLE)
        context.set_details(ENGINE_GONE)
    except ArenaFull as exc:
        context.set_code(grpc.StatusCode.RESOURCE_EXHAUSTED)
        context.set_details(str(exc))
    return None


def _end(call: _Forwarded, context: grpc.aio.ServicerContext) -> None:
    """The engine's status of the call, as the call's."""
    status = call.status
    assert status is not None
    if status.trailing:
        context.set_trailing_metadata(status.trailing)
    if status.code is not grpc.StatusCode.OK:
        context.set_code(status.code)
        context.set_details(status.details)


def forwarding_handlers(client: EngineClient, service: ServiceDescriptor
                        ) -> dict[str, grpc.RpcMethodHandler]:
    """A handler per method of ``service`` that forwards the call's raw bytes."""
    handlers = {}
    for method in service.methods:
        path = f"/{service.full_name}/{method.name}"
        streaming = method.client_streaming
        if method.server_streaming:
            make = grpc.stream_stream_rpc_method_handler if streaming \
                else grpc.unary_stream_rpc_method_handler
            handlers[method.name] = make(_streamed_replies(client, path, streaming))
        else:
            make = grpc.stream_unary_rpc_method_handler if streaming \
                else grpc.unary_unary_rpc_method_handler
            handlers[method.name] = make(_one_reply(client, path, streaming))
    return handlers


Unary = Callable[[Any, grpc.aio.ServicerContext], Any]
Streaming = Callable[[Any, grpc.aio.ServicerContext], AsyncIterator[bytes]]


def _forward(client: EngineClient, path: str, context: grpc.aio.ServicerContext,
             request: Any, streaming: bool, streamed: bool
             ) -> tuple[int, _Forwarded, asyncio.Task[None] | None] | None:
    """Open the call in the engine (None when it cannot: see _open); a client-streaming
    call's messages follow from a pump task (``request`` is then the request iterator, else
    the request's bytes)."""
    opened = _open(client, path, context, None if streaming else request, streamed)
    if opened is None:
        return None
    number, call = opened
    pump = asyncio.get_running_loop().create_task(
        _pump(client, path, number, call, request)) if streaming else None
    return number, call, pump


def _close(client: EngineClient, number: int, pump: asyncio.Task[None] | None) -> None:
    if pump is not None:
        pump.cancel()
    client.close_call(number)


def _one_reply(client: EngineClient, path: str, streaming: bool) -> Unary:
    async def forward(request: Any, context: grpc.aio.ServicerContext) -> bytes | None:
        forwarded = _forward(client, path, context, request, streaming, False)
        if forwarded is None:
            return None
        number, call, pump = forwarded
        try:
            await call.done
        finally:
            _close(client, number, pump)
        _end(call, context)
        return call.reply  # None when the call failed: gRPC sends the status alone

    return forward


async def forward_unary(client: EngineClient, opening: CallOpening
                        ) -> tuple[bytes | None, CallStatus]:
    """A unary call forwarded to the engine: its reply (None when it failed) and its status.
    The REST gateway's calls in a frontend process; a call whose HTTP client goes away is
    cancelled in the engine."""
    try:
        number, call = client.open(opening, streamed=False)
    except EngineGone:
        return None, CallStatus(grpc.StatusCode.UNAVAILABLE, ENGINE_GONE)
    except ArenaFull as exc:
        return None, CallStatus(grpc.StatusCode.RESOURCE_EXHAUSTED, str(exc))
    try:
        await call.done
    finally:
        client.close_call(number)
    assert call.status is not None
    return (call.reply if call.status.code is grpc.StatusCode.OK else None), call.status


def _streamed_replies(client: EngineClient, path: str, streaming: bool) -> Streaming:
    async def forward(request: Any, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[bytes]:
        forwarded = _forward(client, path, context, request, streaming, True)
        if forwarded is None:
            return
        number, call, pump = forwarded
        try:
            async for reply in _replies(client, number, call):
                yield reply
        finally:
            _close(client, number, pump)
        _end(call, context)

    return forward


async def _replies(client: EngineClient, number: int, call: _Forwarded
                   ) -> AsyncIterator[bytes]:
    """The engine's replies as gRPC takes them; what gRPC took returns as credit."""
    replies = call.replies
    assert replies is not None
    taken = 0
    while (reply := await replies.get()) is not None:
        yield reply
        taken += 1
        if taken == CREDIT_BATCH and call.status is None and not client.gone.is_set():
            client.send(Kind.CREDIT, number, credit(taken))
            taken = 0


async def _pump(client: EngineClient, path: str, number: int, call: _Forwarded,
                requests: AsyncIterator[bytes]) -> None:
    """The client's messages to the engine, as its window allows; then the half-close."""
    with contextlib.suppress(EngineGone):
        async for message in requests:
            if call.status is not None:
                return
            await client.message(path, number, call, message)
        if call.status is None:
            client.send(Kind.HALF_CLOSE, number)


async def _report(client: EngineClient) -> None:
    """This process's figures to the engine every STATS_INTERVAL_S, for its /metrics."""
    lag = LoopLag(CollectorRegistry())
    lag.start(asyncio.get_running_loop())
    try:
        while not client.gone.is_set():
            arena = client.arena
            if arena is not None:
                arena.reclaim()
            stats = FrontendStats.of_this_process(lag.histogram, arena.held if arena else 0)
            client.send(Kind.STATS, 0, encode_head(stats.as_tuple()))
            await asyncio.sleep(STATS_INTERVAL_S)
    except EngineGone:
        pass
    finally:
        lag.stop()


async def serve_frontend(settings: ServerSettings, engine: str,
                         services: Iterable[ServiceDescriptor]) -> int:
    limit = frame_limit(settings)
    arena = Arena(settings.arena_bytes, "request") if settings.arena_bytes else None
    connection = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    connection.connect("\0" + engine)  # uvloop takes no abstract name: a socket it takes
    send_hello(connection, arena)
    answers = await asyncio.to_thread(receive_hello, connection, HELLO_TIMEOUT_S)
    client = EngineClient(limit, tls=settings.grpc_use_ssl, arena=arena, answers=answers)
    loop = asyncio.get_running_loop()
    transport, _ = await loop.connect_accepted_socket(lambda: client.receiver, connection)
    client.attach(transport)
    receiving = loop.create_task(client.run())
    server = grpc.aio.server(options=server_options(settings, reuse_port=True))
    for service in services:
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            service.full_name, forwarding_handlers(client, service)),))
    address = f"[{settings.host}]:{settings.grpc_port}" if ":" in settings.host \
        else f"{settings.host}:{settings.grpc_port}"
    credentials = tls.server_credentials(settings)
    if credentials is None:
        server.add_insecure_port(address)
    else:
        server.add_secure_port(address, credentials)
    await server.start()
    http = (await start_http(settings, functools.partial(forward_unary, client),
                             reuse_port=True))[0] if settings.allow_http else None
    client.send(Kind.READY, 0)
    reporting = loop.create_task(_report(client))
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    waiting = [loop.create_task(stop.wait()), loop.create_task(client.gone.wait())]
    await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
    engine_gone = client.gone.is_set()
    grace = 0 if engine_gone else settings.exit_timeout_secs
    await asyncio.gather(server.stop(grace),
                         http.stop(grace) if http is not None else asyncio.sleep(0))
    for task in (*waiting, receiving, reporting):
        task.cancel()
    client.close()
    return 1 if engine_gone else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="a Peregrine frontend process")
    parser.add_argument("--engine", required=True,
                        help="the engine's socket, a name in the abstract namespace")
    parser.add_argument("--settings", required=True, help="settings_json() of the server")
    args = parser.parse_args(argv)
    settings = settings_from_json(args.settings)
    configure_logging(settings.log_level, settings.log_format)
    run = serve_frontend(settings, args.engine, served_services())
    if settings.uvloop:
        import uvloop

        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(run)
    return asyncio.run(run)


if __name__ == "__main__":
    sys.exit(main())
