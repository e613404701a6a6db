"""CPU cost per request of the ways a Python client can call ModelInfer, against the no-op
server: the measurement behind the load path's choice (bench/loadgen/wire.py).

Each flavour runs a closed loop with a few requests in flight for a few seconds in this
process; CPU is getrusage (all threads, gRPC's included) divided by the answers received.
It starts the no-op server itself, pinned to core 0, and pins itself to core 1.

    python -m bench.studies.client_cost [--seconds 3] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

import grpc
import numpy as np
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2 as pb
from tritonclient.grpc import service_pb2_grpc as pb_grpc

from bench.compare.servers import NoopServer
from bench.loadgen.cpu import self_cpu_s
from bench.loadgen.inputs import tensor_from_array
from bench.loadgen.wire import (
    channel_options,
    id_suffix,
    infer_request_bytes,
    stream_callable,
    unary_callable,
)

MODEL = "mlp_classifier"
Call = Callable[[], Awaitable[object]]


async def _closed_loop(call: Call, concurrency: int, seconds: float) -> tuple[int, float]:
    """Answers received and CPU seconds spent while ``concurrency`` calls loop."""
    for _ in range(20):  # warm the channel and the code paths
        await call()
    end = time.monotonic() + seconds
    done = 0

    async def slot() -> None:
        nonlocal done
        while time.monotonic() < end:
            await call()
            done += 1

    cpu0 = self_cpu_s()
    await asyncio.gather(*(slot() for _ in range(concurrency)))
    return done, self_cpu_s() - cpu0


async def _tritonclient(url: str, data: np.ndarray, concurrency: int, seconds: float
                        ) -> tuple[int, float]:
    client = triton_aio.InferenceServerClient(url)

    async def call() -> object:
        tensor = triton_aio.InferInput("input", list(data.shape), "FP32")
        tensor.set_data_from_numpy(data)
        return await client.infer(MODEL, [tensor])

    try:
        return await _closed_loop(call, concurrency, seconds)
    finally:
        await client.close()


async def _stub(url: str, payload: bytes, concurrency: int, seconds: float
                ) -> tuple[int, float]:
    request = pb.ModelInferRequest.FromString(payload)
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        return await _closed_loop(lambda: stub.ModelInfer(request), concurrency, seconds)


async def _generic(url: str, payload: bytes, concurrency: int, seconds: float
                   ) -> tuple[int, float]:
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        call = unary_callable(channel)
        return await _closed_loop(lambda: call(payload), concurrency, seconds)


async def _stream(url: str, payload: bytes, concurrency: int, seconds: float
                  ) -> tuple[int, float]:
    """The generator's streaming path, reduced to its calls: write with id, read, parse."""
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        stream = stream_callable(channel)()
        counter = 0

        async def send() -> None:
            nonlocal counter
            counter += 1
            await stream.write(payload + id_suffix(str(counter)))

        for _ in range(concurrency):
            await send()
        end = time.monotonic() + seconds
        done = 0
        cpu0 = self_cpu_s()
        while time.monotonic() < end:
            pb.ModelStreamInferResponse.FromString(await stream.read())
            done += 1
            await send()
        cpu = self_cpu_s() - cpu0
        await stream.done_writing()
        while await stream.read() is not grpc.aio.EOF:
            pass
        return done, cpu


FLAVOURS = {
    "tritonclient.grpc.aio infer()": _tritonclient,
    "generated stub, prebuilt message": _stub,
    "generic channel, pre-serialised bytes": _generic,
    "stream, pre-serialised bytes + id": _stream,
}


def measure(url: str, concurrency: int, seconds: float, repeats: int
            ) -> list[tuple[str, float, float]]:
    """(flavour, answers/s, CPU microseconds per answer) for each flavour: the median of
    ``repeats`` rounds, the flavours interleaved within each round so drift hits all alike."""
    import uvloop

    data = np.random.default_rng(0).random((1, 64), dtype=np.float32)
    payload = infer_request_bytes(MODEL, "", [tensor_from_array("input", data)])
    samples: dict[str, list[tuple[float, float]]] = {name: [] for name in FLAVOURS}
    for _ in range(repeats):
        for name, flavour in FLAVOURS.items():
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                if flavour is _tritonclient:
                    done, cpu = runner.run(_tritonclient(url, data, concurrency, seconds))
                else:
                    done, cpu = runner.run(flavour(url, payload, concurrency, seconds))  # type: ignore[operator]
            samples[name].append((done / seconds, 1e6 * cpu / max(done, 1)))
    return [(name, statistics.median(r for r, _ in runs), statistics.median(c for _, c in runs))
            for name, runs in samples.items()]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.studies.client_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    if len(os.sched_getaffinity(0)) > 1 and (os.cpu_count() or 1) > 1:
        os.sched_setaffinity(0, {1})
    with NoopServer(cpus="0") as server:
        rows = measure(server.url, args.concurrency, args.seconds, args.repeats)
    print(f"client CPU per request against the no-op server ({args.concurrency} in flight, "
          f"client on CPUs {sorted(os.sched_getaffinity(0))}, median of {args.repeats}):")
    for name, rate, cost in rows:
        print(f"  {name:40s} {rate:8,.0f} answers/s  {cost:6.1f} us CPU/request")
    return 0


if __name__ == "__main__":
    sys.exit(main())
