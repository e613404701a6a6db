"""Large tensors through raw contents vs system shared memory, one request at a time.

Run from the repository root:

    python -m bench.studies.shm_vs_raw [--mib 4] [--requests 100] [--repeats 3] [--output PATH]

A Peregrine subprocess (pinned with ``taskset -c --server-cpus``) serves an FP32 identity
model; this process (pinned to ``--client-cpus``) sends [1, N] FP32 tensors of ``--mib`` MiB
with tritonclient.grpc in a closed loop, one request in flight, in three modes:

* ``raw``: input and output as raw contents (what every client does by default);
* ``shm_in``: input in a registered shared-memory region, output as raw contents;
* ``shm_io``: input and output in shared memory.

Each iteration includes the client's own work: ``set_data_from_numpy`` (raw) or
``set_shared_memory_region`` (shm) for the input, ``as_numpy`` or ``get_contents_as_numpy``
for the output. Modes are interleaved per repeat; throughput is the median of the repeats,
p50/p99 are over every timed request of a mode. Writes JSON (default
bench/results/shm_vs_raw.json) and replaces its own section of bench/RESULTS.md (other
sections are left alone; ``--no-results-md`` skips it).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib
import importlib.resources
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper

from bench.compare.servers import PeregrineProcess
from bench.loadgen.histogram import LatencyHistogram
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section

DEFAULT_OUTPUT = RESULTS_DIR / "shm_vs_raw.json"
SECTION = "## System shared memory vs raw contents"
MODEL = "identity_fp32"
MODES = ("raw", "shm_in", "shm_io")


def load_shared_memory_utils() -> types.ModuleType:
    """``tritonclient.utils.shared_memory``; it imports ``pkg_resources`` only to find its
    ``libcshm.so``, and setuptools 81+ no longer ships that, so lend it a stand-in."""
    try:
        import pkg_resources  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        shim = types.ModuleType("pkg_resources")
        shim.resource_filename = (  # type: ignore[attr-defined]
            lambda package, resource: str(importlib.resources.files(package) / resource))
        sys.modules["pkg_resources"] = shim
        try:
            return importlib.import_module("tritonclient.utils.shared_memory")
        finally:
            del sys.modules["pkg_resources"]
    return importlib.import_module("tritonclient.utils.shared_memory")


def write_model(repository: Path) -> None:
    """An FP32 Identity, [N, -1], max_batch_size 8, dynamic batching with no delay."""
    model_dir = repository / MODEL
    (model_dir / "1").mkdir(parents=True)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], MODEL,
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", "D"])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", "D"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(model_dir / "1" / "model.onnx"))
    (model_dir / "config.pbtxt").write_text(
        f'name: "{MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        'input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        'output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] } ]\n'
        "dynamic_batching { }\n"
        "instance_group [ { count: 1 kind: KIND_CPU } ]\n"
    )


class Client:
    """One tritonclient.grpc client and the two regions the shm modes use."""

    def __init__(self, url: str, x: np.ndarray[Any, Any], shm: types.ModuleType) -> None:
        self.x = x
        self.shm = shm
        self.client = grpcclient.InferenceServerClient(url)
        self.size = int(x.nbytes)
        tag = f"{os.getpid()}"
        self.in_key, self.out_key = f"/peregrine-bench-in-{tag}", f"/peregrine-bench-out-{tag}"
        self.in_handle = shm.create_shared_memory_region("in", self.in_key, self.size)
        self.out_handle = shm.create_shared_memory_region("out", self.out_key, self.size)
        self.client.register_system_shared_memory("in", self.in_key, self.size)
        self.client.register_system_shared_memory("out", self.out_key, self.size)

    def close(self) -> None:
        self.client.unregister_system_shared_memory()
        self.shm.destroy_shared_memory_region(self.in_handle)
        self.shm.destroy_shared_memory_region(self.out_handle)
        self.client.close()

    def request(self, mode: str) -> Callable[[], np.ndarray[Any, Any]]:
        """One iteration of ``mode``: client-side input work, the RPC, the output array."""
        shape = list(self.x.shape)
        infer, shm, x = self.client.infer, self.shm, self.x

        def raw() -> np.ndarray[Any, Any]:
            tensor = grpcclient.InferInput("INPUT0", shape, "FP32")
            tensor.set_data_from_numpy(x)
            return infer(MODEL, [tensor]).as_numpy("OUTPUT0")  # type: ignore[no-any-return]

        def shm_in() -> np.ndarray[Any, Any]:
            shm.set_shared_memory_region(self.in_handle, [x])
            tensor = grpcclient.InferInput("INPUT0", shape, "FP32")
            tensor.set_shared_memory("in", self.size)
            return infer(MODEL, [tensor]).as_numpy("OUTPUT0")  # type: ignore[no-any-return]

        def shm_io() -> np.ndarray[Any, Any]:
            shm.set_shared_memory_region(self.in_handle, [x])
            tensor = grpcclient.InferInput("INPUT0", shape, "FP32")
            tensor.set_shared_memory("in", self.size)
            output = grpcclient.InferRequestedOutput("OUTPUT0")
            output.set_shared_memory("out", self.size)
            infer(MODEL, [tensor], outputs=[output])
            return shm.get_contents_as_numpy(  # type: ignore[no-any-return]
                self.out_handle, np.float32, shape)

        return {"raw": raw, "shm_in": shm_in, "shm_io": shm_io}[mode]


def timed(call: Callable[[], object], requests: int) -> tuple[float, list[float]]:
    latencies = []
    start = time.perf_counter()
    for _ in range(requests):
        t0 = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - start, latencies


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """The load tester's latency summary (HDR histogram) of per-call times in seconds."""
    histogram = LatencyHistogram()
    histogram.record_many(round(s * 1e9) for s in seconds)
    return histogram.summary_ms()


def run(args: argparse.Namespace) -> dict[str, Any]:
    shm = load_shared_memory_utils()
    load_average = os.getloadavg()[0]
    elements = args.mib * 1024 * 1024 // 4
    x = np.random.default_rng(0).standard_normal((1, elements), dtype=np.float32)
    with tempfile.TemporaryDirectory(prefix="shm-bench-") as tmp:
        repository = Path(tmp)
        write_model(repository)
        extra = ["--grpc-max-message-bytes", str(4 * x.nbytes + (1 << 20)),
                 "--allow-client-shm", "true"]
        server_cpus = args.server_cpus or None
        with PeregrineProcess(repository, cpus=server_cpus, extra_args=extra) as server:
            if args.client_cpus and hasattr(os, "sched_setaffinity"):
                os.sched_setaffinity(0, {int(c) for c in args.client_cpus.split(",")})
            client = Client(server.url, x, shm)
            try:
                calls = {mode: client.request(mode) for mode in MODES}
                for mode, call in calls.items():
                    if not np.array_equal(call(), x):
                        raise AssertionError(f"mode {mode} returned wrong data")
                    timed(call, args.warmup)
                rates: dict[str, list[float]] = {m: [] for m in MODES}
                latencies: dict[str, list[float]] = {m: [] for m in MODES}
                for _ in range(args.repeats):
                    for mode, call in calls.items():
                        elapsed, lat = timed(call, args.requests)
                        rates[mode].append(args.requests / elapsed)
                        latencies[mode] += lat
            finally:
                client.close()
    results: list[dict[str, Any]] = []
    for mode in MODES:
        rps = statistics.median(rates[mode])
        latency = latency_ms(latencies[mode])
        results.append({
            "mode": mode,
            "throughput_rps": rps,
            "throughput_gib_s": rps * x.nbytes / 2**30,
            "p50_ms": latency["p50"],
            "p99_ms": latency["p99"],
            "per_repeat_rps": rates[mode],
        })
    raw_rps = results[0]["throughput_rps"]
    for row in results:
        row["speedup_vs_raw"] = row["throughput_rps"] / raw_rps
    return {
        "benchmark": "shm_vs_raw",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(["python -m bench.studies.shm_vs_raw", *sys.argv[1:]]),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_average_1m": load_average,
        "model": f"{MODEL} (onnxruntime Identity)",
        "tensor_shape": list(x.shape),
        "tensor_bytes": int(x.nbytes),
        "in_flight": 1,
        "requests_per_repeat": args.requests,
        "repeats": args.repeats,
        "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus,
        "statistic": "throughput: median of repeats; p50/p99: over all timed requests",
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    mib = report["tensor_bytes"] / 2**20
    lines = [
        SECTION, "",
        f"{report['created']} · {report['cpu_count']} CPUs · load average (1 min) at start "
        f"{report['load_average_1m']:.2f} · command: `{report['command']}`", "",
        f"`{report['model']}`, one [1, {report['tensor_shape'][1]}] FP32 tensor ({mib:.0f} MiB) "
        "in and out per request, tritonclient.grpc closed loop with 1 request in flight; "
        f"server on CPU {report['server_cpus']}, client on CPU {report['client_cpus']}; client "
        "work (filling the input, reading the output) included; throughput is the median of "
        f"{report['repeats']} interleaved repeats of {report['requests_per_repeat']} requests.",
        "",
        "| mode | infer/s | GiB/s each way | p50 ms | p99 ms | vs raw |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    labels = {"raw": "raw contents in and out", "shm_in": "input in shared memory",
              "shm_io": "input and output in shared memory"}
    for row in report["results"]:
        lines.append(
            f"| {labels[row['mode']]} | {row['throughput_rps']:.1f} | "
            f"{row['throughput_gib_s']:.2f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['speedup_vs_raw']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--mib", type=int, default=4, help="tensor size in MiB")
    parser.add_argument("--requests", type=int, default=100, help="timed requests per repeat")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--server-cpus", default="0",
                        help="taskset -c for the server ('' for no pinning)")
    parser.add_argument("--client-cpus", default="1",
                        help="CPUs this client is pinned to ('' for no pinning)")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--no-results-md", action="store_true",
                        help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    report = run(args)
    print(f"{'mode':<8}{'infer/s':>10}{'GiB/s':>8}{'p50 ms':>9}{'p99 ms':>9}{'x raw':>7}")
    for row in report["results"]:
        print(f"{row['mode']:<8}{row['throughput_rps']:>10.1f}{row['throughput_gib_s']:>8.2f}"
              f"{row['p50_ms']:>9.2f}{row['p99_ms']:>9.2f}{row['speedup_vs_raw']:>7.2f}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    if not args.no_results_md:
        replace_section(markdown(report))
        print(f"updated {RESULTS_MD}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
