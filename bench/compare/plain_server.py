"""A minimal plain-Python batching V2 server: the yardstick Peregrine's compiled path must beat.

No compiled code of ours, no statistics, no metrics, no validation beyond what numpy does:
decode with ``np.frombuffer``, queue (inputs, future) pairs, and whenever the model's one ONNX
Runtime thread is idle, run everything queued (up to max_batch_size rows) as one batch:
``np.concatenate``, ``session.run`` in a worker thread, split by rows, raw bytes back. Unary
and streaming inference; health, ModelMetadata and ModelConfig answered from config.pbtxt so
perf_analyzer can drive it.

    python -m bench.compare.plain_server --model-repository DIR [--port 8012]
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections import deque
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench.compare.noop_server import describe, read_configs

#: V2 datatype names <-> numpy, for the fixed-size types the example models use.
DTYPES = {"FP32": np.float32, "FP64": np.float64, "FP16": np.float16, "INT64": np.int64,
          "INT32": np.int32, "INT16": np.int16, "INT8": np.int8, "UINT8": np.uint8,
          "BOOL": np.bool_}
WIRE = {np.dtype(v): k for k, v in DTYPES.items()}

Outputs = list[tuple[str, np.ndarray]]


class Model:
    """One model version: an ONNX Runtime session on one thread, and its batch queue."""

    def __init__(self, path: Path, max_batch_size: int) -> None:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.max_rows = max(1, max_batch_size)
        self.pending: deque[tuple[dict[str, np.ndarray], asyncio.Future[Outputs]]] = deque()
        self.busy = False
        self.worker = ThreadPoolExecutor(max_workers=1)

    def submit(self, inputs: dict[str, np.ndarray]) -> asyncio.Future[Outputs]:
        future: asyncio.Future[Outputs] = asyncio.get_running_loop().create_future()
        self.pending.append((inputs, future))
        if not self.busy:
            self.run_batch()
        return future

    def run_batch(self) -> None:
        taken, rows = [], 0
        while self.pending:
            count = len(next(iter(self.pending[0][0].values())))
            if taken and rows + count > self.max_rows:
                break
            taken.append(self.pending.popleft())
            rows += count
        batch = {name: np.concatenate([inputs[name] for inputs, _ in taken])
                 for name in taken[0][0]}
        self.busy = True
        running = asyncio.get_running_loop().run_in_executor(
            self.worker, self.session.run, self.output_names, batch)
        running.add_done_callback(lambda done: self.finish(taken, done))

    def finish(self, taken: list[tuple[dict[str, np.ndarray], asyncio.Future[Outputs]]],
               done: asyncio.Future[list[np.ndarray]]) -> None:
        self.busy = False
        try:
            outputs = done.result()
        except Exception as exc:
            for _, future in taken:
                future.set_exception(exc)
        else:
            start = 0
            for inputs, future in taken:
                end = start + len(next(iter(inputs.values())))
                future.set_result([(n, o[start:end])
                                   for n, o in zip(self.output_names, outputs, strict=True)])
                start = end
        if self.pending:
            self.run_batch()


def onnx_configs(repository: Path) -> dict[str, Any]:
    """The configs of the ONNX models: the yardstick runs ONNX Runtime only (the example
    repository's Python models are left out)."""
    return {name: config for name, config in read_configs(repository).items()
            if config.backend in ("", "onnxruntime")
            and config.platform in ("", "onnxruntime_onnx")}


def load_models(repository: Path) -> dict[str, Model]:
    models = {}
    for name, config in onnx_configs(repository).items():
        versions = sorted(int(p.name) for p in (repository / name).iterdir() if p.name.isdigit())
        models[name] = Model(repository / name / str(versions[-1]) / "model.onnx",
                             config.max_batch_size)
    return models


class PlainServicer(pb_grpc.GRPCInferenceServiceServicer):  # type: ignore[misc]
    def __init__(self, models: dict[str, Model], configs: dict[str, Any]) -> None:
        self.models = models
        self.configs = configs

    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=True)

    async def ServerMetadata(self, request: Any, context: Any) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="plain", version="1")

    async def ModelReady(self, request: Any, context: Any) -> pb.ModelReadyResponse:
        return pb.ModelReadyResponse(ready=request.name in self.models)

    async def ModelMetadata(self, request: Any, context: Any) -> pb.ModelMetadataResponse:
        if request.name not in self.configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.name}'")
        return describe(self.configs[request.name])

    async def ModelConfig(self, request: Any, context: Any) -> pb.ModelConfigResponse:
        if request.name not in self.configs:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"no model '{request.name}'")
        return pb.ModelConfigResponse(config=self.configs[request.name])

    def start(self, request: pb.ModelInferRequest) -> asyncio.Future[Outputs]:
        inputs = {t.name: np.frombuffer(raw, DTYPES[t.datatype]).reshape(tuple(t.shape))
                  for t, raw in zip(request.inputs, request.raw_input_contents, strict=True)}
        return self.models[request.model_name].submit(inputs)

    @staticmethod
    def response(request: pb.ModelInferRequest, outputs: Outputs) -> pb.ModelInferResponse:
        return pb.ModelInferResponse(
            model_name=request.model_name, model_version="1", id=request.id,
            outputs=[pb.ModelInferResponse.InferOutputTensor(
                name=name, datatype=WIRE[value.dtype], shape=value.shape)
                for name, value in outputs],
            raw_output_contents=[value.tobytes() for _, value in outputs])

    async def ModelInfer(self, request: pb.ModelInferRequest,
                         context: Any) -> pb.ModelInferResponse:
        return self.response(request, await self.start(request))

    async def ModelStreamInfer(self, request_iterator: AsyncIterator[pb.ModelInferRequest],
                               context: Any) -> AsyncIterator[pb.ModelStreamInferResponse]:
        answers: asyncio.Queue[pb.ModelStreamInferResponse | None] = asyncio.Queue()
        inflight = 0
        reading = True

        def answered(request: pb.ModelInferRequest, done: asyncio.Future[Outputs]) -> None:
            nonlocal inflight
            inflight -= 1
            answers.put_nowait(pb.ModelStreamInferResponse(
                infer_response=self.response(request, done.result())))
            if not reading and not inflight:
                answers.put_nowait(None)

        async def read() -> None:
            nonlocal inflight, reading
            async for request in request_iterator:
                inflight += 1
                self.start(request).add_done_callback(
                    lambda done, request=request: answered(request, done))
            reading = False
            if not inflight:
                answers.put_nowait(None)

        reader = asyncio.get_running_loop().create_task(read())
        while (answer := await answers.get()) is not None:
            yield answer
        await reader


async def serve(host: str, port: int, repository: Path) -> None:
    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.so_reuseport", 0)])
    pb_grpc.add_GRPCInferenceServiceServicer_to_server(
        PlainServicer(load_models(repository), onnx_configs(repository)), server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    print(f"plain batching server listening on {host}:{bound}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1.0)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare.plain_server",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8012)
    parser.add_argument("--model-repository", type=Path, required=True)
    args = parser.parse_args(argv)
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve(args.host, args.port, args.model_repository))
    return 0


if __name__ == "__main__":
    sys.exit(main())
