"""A closed loop of ModelReady calls against a server, and the server's CPU per call.

ModelReady does no batching and no model work: what a call costs the server is gRPC's and
the server's per-call path alone, so comparing one process with ``--frontends N`` on it
isolates the process boundary from the batching that makes ModelInfer's CPU per request
swing from run to run. Reports the CPU of the server's whole process tree per call and of
its root process alone (with frontends, the engine's). Used by bench/studies/frontends.py
and bench/studies/boundary_cost.py.

    python -m bench.studies.ready_load --url HOST:PORT --model M --server-pid PID
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time

import grpc

from bench.loadgen.cpu import process_cpu_s, tree_cpu_s
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc


def _cpu_s(pid: int) -> tuple[float, float]:
    """CPU seconds of ``pid``'s process tree and of ``pid`` alone."""
    tree, own = tree_cpu_s(pid), process_cpu_s(pid)
    if tree is None or own is None:
        raise RuntimeError(f"cannot read the CPU time of process {pid}")
    return tree, own


async def run(url: str, model: str, concurrency: int, seconds: float, warmup: float,
              server_pid: int) -> dict[str, float]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        request = pb.ModelReadyRequest(name=model)
        loop = asyncio.get_running_loop()
        counting = False
        calls = 0
        end = loop.time() + warmup + seconds

        async def caller() -> None:
            nonlocal calls
            while loop.time() < end:
                reply = await stub.ModelReady(request)
                if not reply.ready:
                    raise RuntimeError(f"model {model} is not ready")
                if counting:
                    calls += 1

        callers = [loop.create_task(caller()) for _ in range(concurrency)]
        await asyncio.sleep(warmup)
        counting = True
        (cpu_before, own_before), started = _cpu_s(server_pid), time.monotonic()
        await asyncio.sleep(seconds)
        counting = False
        (cpu_after, own_after), elapsed = _cpu_s(server_pid), time.monotonic() - started
        await asyncio.gather(*callers)
    return {"calls_per_s": calls / elapsed,
            "server_cpu_us_per_call": (cpu_after - cpu_before) / calls * 1e6,
            "root_cpu_us_per_call": (own_after - own_before) / calls * 1e6}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", required=True)
    parser.add_argument("--server-pid", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    args = parser.parse_args(argv)
    figures = asyncio.run(run(args.url, args.model, args.concurrency, args.seconds,
                              args.warmup, args.server_pid))
    json.dump(figures, sys.stdout)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
