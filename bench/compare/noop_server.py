"""A V2 gRPC servicer that does no work: the floor of Python gRPC cost on this machine.

ModelInfer parses the request (as any servicer does) and answers one fixed, pre-built
response; ModelStreamInfer answers each request with that response, in order, carrying the
request's id when it has one. Health RPCs answer true.
ModelMetadata and ModelConfig are NOT_FOUND, so drive it with ``--input-file``; or give it a
model repository (``--model-repository``) and it describes each model there from its
config.pbtxt, as perf_analyzer needs, while still doing no work.

    python -m bench.compare.noop_server --port 8011 [--model-repository DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import grpc
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

NAME = "noop"


def fixed_response(output_bytes: int) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="noop", model_version="1")
    response.outputs.add(name="OUTPUT0", datatype="UINT8", shape=[1, output_bytes])
    response.raw_output_contents.append(bytes(output_bytes))
    return response


def read_configs(repository: Path | None) -> dict[str, Any]:
    """Model name -> its parsed config.pbtxt (tritonclient's ModelConfig message)."""
    if repository is None:
        return {}
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    configs = {}
    for path in sorted(repository.glob("*/config.pbtxt")):
        config = text_format.Parse(path.read_text(encoding="utf-8"),
                                   model_config_pb2.ModelConfig())
        configs[config.name or path.parent.name] = config
    return configs


def describe(config: Any) -> pb.ModelMetadataResponse:
    """ModelMetadata from a config: V2 datatypes, the batch dim as -1 when the model batches."""
    from tritonclient.grpc import model_config_pb2

    batch = [-1] if config.max_batch_size > 0 else []

    def tensor(t: Any) -> pb.ModelMetadataResponse.TensorMetadata:
        datatype = model_config_pb2.DataType.Name(t.data_type).removeprefix("TYPE_")
        return pb.ModelMetadataResponse.TensorMetadata(
            name=t.name, datatype="BYTES" if datatype == "STRING" else datatype,
            shape=[*batch, *t.dims])

    return pb.ModelMetadataResponse(
        name=config.name, versions=["1"], platform=config.platform,
        inputs=[tensor(t) for t in config.input], outputs=[tensor(t) for t in config.output])


class NoopServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, output_bytes: int, configs: dict[str, Any] | None = None) -> None:
        self._response = fixed_response(output_bytes)
        self._stream_response = pb.ModelStreamInferResponse(infer_response=self._response)
        self._configs = configs or {}

    def fixed_response_bytes(self) -> bytes:
        data: bytes = self._response.SerializeToString()
        return data

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
        config = self._configs.get(request.name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.name}'")
        return describe(config)

    async def ModelConfig(self, request: pb.ModelConfigRequest,
                          context: grpc.aio.ServicerContext) -> pb.ModelConfigResponse:
        config = self._configs.get(request.name)
        if config is None:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.name}'")
        return pb.ModelConfigResponse(config=config)

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: grpc.aio.ServicerContext) -> pb.ModelInferResponse:
        return self._response

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[pb.ModelInferRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.ModelStreamInferResponse]:
        async for request in request_iterator:
            if not request.id:
                yield self._stream_response
                continue
            # Echo the id, as every real server does and perf_analyzer needs to match answers.
            response = pb.ModelStreamInferResponse()
            response.infer_response.CopyFrom(self._response)
            response.infer_response.id = request.id
            yield response


def raw_infer_handlers(servicer: NoopServicer) -> grpc.GenericRpcHandler:
    """ModelInfer on the message's bytes, never parsed, answered with the fixed response's
    bytes: what gRPC itself costs a call (its memory above all), with no servicer work."""
    answer = servicer.fixed_response_bytes()

    async def model_infer(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return answer

    return grpc.method_handlers_generic_handler(
        "inference.GRPCInferenceService",
        {"ModelInfer": grpc.unary_unary_rpc_method_handler(model_infer)})


async def serve(host: str, port: int, output_bytes: int, repository: Path | None = None,
                raw_infer: bool = False, max_message_bytes: int = 64 << 20) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", max_message_bytes),
                                      ("grpc.so_reuseport", 0)])
    servicer = NoopServicer(output_bytes, read_configs(repository))
    if raw_infer:  # registered first, so it takes ModelInfer
        server.add_generic_rpc_handlers((raw_infer_handlers(servicer),))
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(servicer, server)
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
    parser = argparse.ArgumentParser(
        prog="python -m bench.compare.noop_server", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8011)
    parser.add_argument("--output-bytes", type=int, default=40,
                        help="size of the fixed output tensor (default %(default)s)")
    parser.add_argument("--no-uvloop", action="store_true", help="use the default event loop")
    parser.add_argument("--model-repository", type=Path, default=None,
                        help="describe the models of this repository in ModelMetadata and "
                             "ModelConfig (for perf_analyzer)")
    parser.add_argument("--raw-infer", action="store_true",
                        help="take ModelInfer's message as bytes, unparsed (memory floors)")
    parser.add_argument("--max-message-bytes", type=int, default=64 << 20,
                        help="gRPC's receive limit (default %(default)s)")
    args = parser.parse_args(argv)
    factory = None
    if not args.no_uvloop:
        import uvloop

        factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=factory) as runner:
        runner.run(serve(args.host, args.port, args.output_bytes, args.model_repository,
                         args.raw_infer, args.max_message_bytes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
