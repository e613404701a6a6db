"""A V2 gRPC servicer that does no work: the floor of Python gRPC cost on this machine.

ModelInfer parses the request (as any servicer does) and answers one fixed, pre-built
response; ModelStreamInfer answers each request with one fixed response, in order (no id
echoed: the load generator then matches answers in order). Health RPCs answer true;
ModelMetadata is NOT_FOUND, so drive it with ``--input-file``.

    python -m bench.noop_server --port 8011
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

NAME = "noop"


def fixed_response(output_bytes: int) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="noop", model_version="1")
    response.outputs.add(name="OUTPUT0", datatype="UINT8", shape=[1, output_bytes])
    response.raw_output_contents.append(bytes(output_bytes))
    return response


class NoopServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, output_bytes: int) -> None:
        self._response = fixed_response(output_bytes)
        self._stream_response = pb.ModelStreamInferResponse(infer_response=self._response)

    async def ServerLive(self, request: pb.ServerLiveRequest,
                         context: grpc.aio.ServicerContext) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: pb.ServerReadyRequest,
                          context: grpc.aio.ServicerContext) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ModelReady(self, request: pb.ModelReadyRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=True)

    async def ServerMetadata(self, request: pb.ServerMetadataRequest,
                             context: grpc.aio.ServicerContext) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name=NAME, version="1")

    async def ModelMetadata(self, request: pb.ModelMetadataRequest,
                            context: grpc.aio.ServicerContext) -> pb.ModelMetadataResponse:
        await context.abort(grpc.StatusCode.NOT_FOUND, "the no-op server knows no models")
        raise AssertionError("abort returns by raising")

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return self._response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for _ in request_iterator:
            yield self._stream_response


async def serve(host: str, port: int, output_bytes: int) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(NoopServicer(output_bytes), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"noop server listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.noop_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--output-bytes", type=int, default=40,
                        help="size of the fixed output tensor (default %(default)s)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    args = parser.parse_args(argv)
    factory = None
    if not args.no_uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.output_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
