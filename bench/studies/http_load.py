"""The HTTP load of bench/studies/http_server.py: a closed loop of ``--concurrency``
keep-alive connections, each sending one prepared request and reading its answer, again and
again; the generator itself is a few lines of asyncio on uvloop, so that one core of it
drives more requests than the server answers.

    python -m bench.studies.http_load --port P --body FILE [--header-length N]
        --concurrency 64 --seconds 4 --warmup 1 --server-pid PID

prints one JSON object: requests answered in the measured window, their rate, p50/p99 latency,
errors (a status other than 200) and the server's CPU seconds over the window (its process
tree).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

import numpy as np
import uvloop

from bench.loadgen.cpu import tree_cpu_s


def request_bytes(port: int, path: str, body: bytes, header_length: int | None) -> bytes:
    head = [f"POST {path} HTTP/1.1", f"Host: 127.0.0.1:{port}",
            f"Content-Length: {len(body)}", "Content-Type: application/json"]
    if header_length is not None:
        head.append(f"Inference-Header-Content-Length: {header_length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def connection(port: int, request: bytes, measure_from: float, until: float,
                     latencies: list[int], errors: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while (now := time.perf_counter()) < until:
            started = time.perf_counter_ns()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if now >= measure_from:
                latencies.append(time.perf_counter_ns() - started)
                if head[9:12] != b"200":
                    errors.append(int(head[9:12]))
    finally:
        writer.close()


async def run(args: argparse.Namespace, request: bytes) -> dict[str, float | int | None]:
    start = time.perf_counter()
    measure_from = start + args.warmup
    until = measure_from + args.seconds
    latencies: list[int] = []
    errors: list[int] = []
    tasks = [asyncio.create_task(connection(args.port, request, measure_from, until,
                                            latencies, errors))
             for _ in range(args.concurrency)]
    await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
    cpu_before = tree_cpu_s(args.server_pid) if args.server_pid else None
    await asyncio.sleep(max(0.0, until - time.perf_counter()))
    cpu_after = tree_cpu_s(args.server_pid) if args.server_pid else None
    await asyncio.gather(*tasks)
    values = np.asarray(latencies, dtype=np.float64) / 1e6
    return {
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / args.seconds, 1),
        "p50_ms": round(float(np.percentile(values, 50)), 3) if len(values) else None,
        "p99_ms": round(float(np.percentile(values, 99)), 3) if len(values) else None,
        "errors": len(errors),
        "server_cpu_s": None if cpu_before is None or cpu_after is None
        else round(cpu_after - cpu_before, 4),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--path", default="/v2/models/mlp_classifier/infer")
    parser.add_argument("--body", required=True)
    parser.add_argument("--header-length", type=int, default=None)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--server-pid", type=int, default=0)
    args = parser.parse_args(argv)
    request = request_bytes(args.port, args.path, Path(args.body).read_bytes(),
                            args.header_length)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        print(json.dumps(runner.run(run(args, request))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
