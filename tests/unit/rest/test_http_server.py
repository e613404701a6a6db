"""The REST server's HTTP/1.1 framing and bounds (server/rest/server.py), on real sockets, with
a real handler table whose handlers stand in for the server's services."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import grpc
import pytest

from server._pb import grpc_service_pb2 as pb
from server.multiproc.engine import HandlerTable
from server.rest import server as rest_server
from server.rest.gateway import Gateway
from server.services import INFERENCE_SERVICE

MAX_BODY = 1024


class Calls:
    """ServerLive answers at once; ModelInfer waits until released (or cancelled)."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def live(self, request: pb.ServerLiveRequest, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def infer(self, request: bytes, context: Any) -> bytes:
        self.started.set()
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        return pb.ModelInferResponse(model_name="m").SerializeToString()


@pytest.fixture
async def served(monkeypatch: pytest.MonkeyPatch
                 ) -> AsyncIterator[tuple[rest_server.HttpServer, int, Calls]]:
    monkeypatch.setattr(rest_server, "SWEEP_INTERVAL_S", 0.05)
    calls = Calls()
    table = HandlerTable()
    table.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(INFERENCE_SERVICE, {
        "ServerLive": grpc.unary_unary_rpc_method_handler(
            calls.live, pb.ServerLiveRequest.FromString,
            pb.ServerLiveResponse.SerializeToString),
        "ModelInfer": grpc.unary_unary_rpc_method_handler(calls.infer)}),))
    server = rest_server.HttpServer(Gateway(table.call, MAX_BODY), MAX_BODY, max_connections=2)
    port = await server.start("127.0.0.1", 0, reuse_port=False)
    try:
        yield server, port, calls
    finally:
        calls.release.set()
        await server.stop(1.0)


async def exchange(port: int, data: bytes) -> bytes:
    """Send ``data``, read until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    return answer


LIVE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n"
CLOSE = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
INFER = b"POST /v2/models/m/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


async def test_connections_past_the_limit_are_answered_503(
        served: tuple[rest_server.HttpServer, int, Calls]) -> None:
    _, port, _ = served
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(2)]
    for reader, writer in held:
        writer.write(LIVE)
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    refused = await exchange(port, LIVE)
    assert refused.startswith(b"HTTP/1.1 503") and b"connection: close" in refused
    for _, writer in held:
        writer.close()
        await writer.wait_closed()
    await asyncio.sleep(0.1)
    assert (await exchange(port, CLOSE)).startswith(b"HTTP/1.1 200")


async def test_heads_and_bodies_past_their_bounds(
        served: tuple[rest_server.HttpServer, int, Calls]) -> None:
    _, port, _ = served
    huge = b"GET /v2/health/live HTTP/1.1\r\nX-Big: " + b"a" * (70 * 1024) + b"\r\n\r\n"
    assert (await exchange(port, huge)).startswith(b"HTTP/1.1 431")
    declared = b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 5000\r\n\r\n"
    assert (await exchange(port, declared)).startswith(b"HTTP/1.1 413")
    chunked = (b"POST /v2/models/m/infer HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"
               + b"400\r\n" + b"x" * 1024 + b"\r\n" + b"10\r\n" + b"y" * 16 + b"\r\n0\r\n\r\n")
    assert (await exchange(port, chunked)).startswith(b"HTTP/1.1 413")
    assert (await exchange(port, b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")


async def test_expect_100_continue(served: tuple[rest_server.HttpServer, int, Calls]) -> None:
    _, port, calls = served
    calls.release.set()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 2\r\n"
                 b"Expect: 100-continue\r\n\r\n")
    assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
    writer.write(b"{}")
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
    writer.close()


async def test_slow_requests_and_idle_connections_are_closed(
        served: tuple[rest_server.HttpServer, int, Calls],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, port, _ = served
    monkeypatch.setattr(rest_server, "REQUEST_TIMEOUT_S", 0.2)
    monkeypatch.setattr(rest_server, "KEEPALIVE_TIMEOUT_S", 0.2)
    slow = await exchange(port, b"POST /v2/models/m/infer HTTP/1.1\r\nContent-Length: 9\r\n\r\n{")
    assert slow.startswith(b"HTTP/1.1 408")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(LIVE)
    answer = await asyncio.wait_for(reader.read(), 5)  # then the idle connection is closed
    assert answer.startswith(b"HTTP/1.1 200") and answer.count(b"HTTP/1.1") == 1
    writer.close()


async def test_a_client_that_goes_away_cancels_its_call(
        served: tuple[rest_server.HttpServer, int, Calls]) -> None:
    _, port, calls = served
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(INFER)
    await asyncio.wait_for(calls.started.wait(), 5)
    writer.close()
    await asyncio.wait_for(calls.cancelled.wait(), 5)  # times out unless it is cancelled
    assert calls.cancelled.is_set() and not calls.release.is_set()


async def test_stop_lets_a_request_finish_then_closes(
        served: tuple[rest_server.HttpServer, int, Calls]) -> None:
    server, port, calls = served
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(INFER)
    await asyncio.wait_for(calls.started.wait(), 5)
    stopping = asyncio.create_task(server.stop(5.0))
    await asyncio.sleep(0.1)
    calls.release.set()
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 200") and b"connection: close" in answer
    await stopping
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    writer.close()
