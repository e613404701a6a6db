"""The same request-path stages as bench/studies/ablation_server.py, timed in-process without gRPC:
what each stage costs when its code runs back to back in a quiet process.

Next to the ablation through gRPC this separates the cost of our code from what running it
between gRPC's work on one shared core does to it. A Peregrine server is started in this
process (its gRPC port unused), and 64 coroutines call the stage's ModelInfer handler
directly with the same request bytes the load generator sends; the figure is process CPU
time per request, pinned to the server's core.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.studies.ablation_server import STAGES, stage_handler


class _Context:
    """The parts of grpc.aio.ServicerContext the handlers use, for a call with no deadline."""

    def time_remaining(self) -> float | None:
        return None

    def invocation_metadata(self) -> tuple[()]:
        return ()

    async def abort(self, code: Any, details: str) -> None:
        raise RuntimeError(f"{code}: {details}")


#: numpy dtype (without byte order) -> V2 datatype, for the dtypes bench input files hold.
_WIRE_TYPES = {"f4": "FP32", "f8": "FP64", "i4": "INT32", "i8": "INT64"}


def _request(model: str, input_file: Path) -> bytes:
    """The serialized ModelInferRequest the load generator sends for ``input_file``."""
    from server._pb import grpc_service_pb2 as pb

    request = pb.ModelInferRequest(model_name=model, id="1")
    with np.load(input_file) as arrays:
        for name in arrays.files:
            array = np.ascontiguousarray(arrays[name])
            request.inputs.add(name=name, datatype=_WIRE_TYPES[array.dtype.str[1:]],
                               shape=list(array.shape))
            request.raw_input_contents.append(array.tobytes())
    data: bytes = request.SerializeToString()
    return data


async def _measure(repository: Path, inputs: dict[str, Path], concurrency: int,
                   requests: int) -> dict[str, dict[str, float]]:
    from server.app import PeregrineServer
    from server.frontend.inference import InferenceServicer
    from server.settings import ServerSettings

    server = PeregrineServer(ServerSettings(model_repository=repository, grpc_port=0,
                                            metrics_port=0, allow_metrics=False))
    await server.start()
    try:
        servicer = InferenceServicer(server.control, server.dataplane, server.state, server.codec,
                                     admission=server.admission)
        context = _Context()
        results: dict[str, dict[str, float]] = {}
        for model, input_file in inputs.items():
            request = _request(model, input_file)
            results[model] = {}
            for stage in STAGES:
                handler = stage_handler(stage)

                async def worker(count: int, handler: Any = handler,
                                 request: Any = request) -> None:
                    for _ in range(count):
                        await handler(servicer, request, context)

                per_worker = max(1, requests // concurrency)
                await asyncio.gather(*(worker(20) for _ in range(concurrency)))  # warm-up
                start = time.process_time()
                await asyncio.gather(*(worker(per_worker) for _ in range(concurrency)))
                used = time.process_time() - start
                results[model][stage] = used / (per_worker * concurrency) * 1e6
        return results
    finally:
        await server.stop(grace=1.0)


def measure(repository: Path, inputs: dict[str, Path], cpus: Sequence[int],
            concurrency: int = 64, requests: int = 20_000) -> dict[str, dict[str, float]]:
    """CPU microseconds per request of each stage, per model, on ``cpus``."""
    import uvloop

    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, set(cpus))
    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            return runner.run(_measure(repository, inputs, concurrency, requests))
    finally:
        os.sched_setaffinity(0, previous)
