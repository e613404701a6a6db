"""The HTTP server candidates of bench/studies/http_server.py, each carrying Peregrine's REST
gateway (server/rest/gateway.py) in front of the same in-process handlers, so only the HTTP
server differs:

- ``httptools``: Peregrine's own (server/rest/server.py: an asyncio protocol over httptools),
  as ``peregrine serve --allow-http true`` runs it;
- ``aiohttp``: aiohttp's low-level web server (``aiohttp.web.Server``), one handler;
- ``uvicorn``: uvicorn with its httptools protocol and a raw ASGI application (no framework).

Run by the study as ``python -m bench.studies.http_candidates CANDIDATE --model-repository DIR
--grpc-port P --http-port Q``; serves gRPC on P (the readiness check and the gRPC row) and the
candidate on Q until SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop

from server.app import PeregrineServer
from server.rest.gateway import Gateway, HttpRequest
from server.rest.server import peer_of
from server.settings import ServerSettings

CANDIDATES = ("httptools", "aiohttp", "uvicorn")
Stop = Callable[[], Awaitable[None]]


async def serve_aiohttp(gateway: Gateway, host: str, port: int, max_body: int) -> Stop:
    from aiohttp import web

    async def handle(request: web.BaseRequest) -> web.Response:
        body = await request.read()
        peer = request.transport.get_extra_info("peername") if request.transport else None
        reply = await gateway.handle(HttpRequest(
            request.method, request.raw_path.partition("?")[0],
            [(name.lower(), value) for name, value in request.headers.items()], body,
            peer_of(peer, 2)))
        return web.Response(status=reply.status, body=reply.body, headers=reply.headers)

    runner = web.ServerRunner(web.Server(handle, client_max_size=max_body),
                              handle_signals=False, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=1024).start()
    return runner.cleanup


async def serve_uvicorn(gateway: Gateway, host: str, port: int, max_body: int) -> Stop:
    import uvicorn

    async def app(scope: dict[str, Any], receive: Callable[[], Awaitable[dict[str, Any]]],
                  send: Callable[[dict[str, Any]], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            if not message.get("more_body") or size > max_body:
                break
        client = scope.get("client")
        reply = await gateway.handle(HttpRequest(
            scope["method"], scope["raw_path"].decode("latin-1").partition("?")[0],
            [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"]],
            b"".join(chunks), peer_of(tuple(client) if client else None, 2)))
        headers = [(b"content-length", str(len(reply.body)).encode()),
                   *((k.encode(), v.encode()) for k, v in reply.headers)]
        await send({"type": "http.response.start", "status": reply.status,
                    "headers": headers})
        await send({"type": "http.response.body", "body": reply.body})

    config = uvicorn.Config(app, host=host, port=port, loop="none", http="httptools",
                            lifespan="off", access_log=False, log_level="warning",
                            backlog=1024, timeout_keep_alive=75)
    server = uvicorn.Server(config)
    task = asyncio.get_running_loop().create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)

    async def stop() -> None:
        server.should_exit = True
        await task

    return stop


async def main(args: argparse.Namespace) -> None:
    settings = ServerSettings(
        model_repository=args.model_repository, grpc_port=args.grpc_port,
        http_port=args.http_port, allow_http=args.candidate == "httptools", metrics_port=0,
        allow_metrics=False, log_level="warning")
    server = PeregrineServer(settings)
    await server.start()
    stop_candidate: Stop | None = None
    gateway = Gateway(server.handlers.call, settings.grpc_max_message_bytes)
    if args.candidate == "aiohttp":
        stop_candidate = await serve_aiohttp(gateway, settings.host, args.http_port,
                                             settings.grpc_max_message_bytes)
    elif args.candidate == "uvicorn":
        stop_candidate = await serve_uvicorn(gateway, settings.host, args.http_port,
                                             settings.grpc_max_message_bytes)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    if stop_candidate is not None:
        await stop_candidate()
    await server.stop(grace=2.0)


def cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("candidate", choices=CANDIDATES)
    parser.add_argument("--model-repository", type=Path, required=True)
    parser.add_argument("--grpc-port", type=int, required=True)
    parser.add_argument("--http-port", type=int, required=True)
    args = parser.parse_args(argv)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main(args))
    return 0


if __name__ == "__main__":
    sys.exit(cli())
