"""Which HTTP server carries the REST surface: the candidates on the MLP example at 64 requests
in flight.

Each candidate (bench/studies/http_candidates.py: Peregrine's own asyncio protocol over
httptools, aiohttp's low-level server, uvicorn with a raw ASGI application) carries the same
REST gateway in front of the same handlers, in a server process pinned to ``--server-cpus``;
the load (bench/studies/http_load.py, 64 keep-alive connections in a closed loop) runs pinned
to ``--client-cpus``. Two bodies per candidate: JSON tensors (``data``), and Triton's binary
tensor extension (the input as ``binary_data_size`` bytes after the JSON header, both outputs
asked for in binary), as tritonclient.http sends them. Reported per candidate and body:
infer/s, p50/p99, and the server's CPU per request (the whole process, over the measured
window). A gRPC unary row (``peregrine bench run``) on the same server process is the
reference.

    python -m bench.studies.http_server [--seconds 4] [--repeats 2] [--candidates ...]

Writes bench/results/http_server.json and .png and the "HTTP server candidates" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.compare.servers import ServerProcess, free_port, pinned
from bench.loadgen.environment import REPO_ROOT, environment
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.bench_run import drive
from bench.studies.http_candidates import CANDIDATES
from bench.studies.study_run import study_arguments, write_document

SECTION = "## HTTP server candidates (REST surface)"
RESULTS_JSON = RESULTS_DIR / "http_server.json"
RESULTS_PNG = RESULTS_DIR / "http_server.png"
MODEL = "mlp_classifier"
CONCURRENCY = 64
BODIES = ("json", "binary")


def bodies(folder: Path) -> dict[str, tuple[Path, int | None]]:
    """The two request bodies (and the JSON header's length of the binary one)."""
    rng = np.random.default_rng(0)
    values = (rng.random(64, dtype=np.float32) * 16).astype(np.float32)
    as_json = json.dumps({"inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                                      "data": values.tolist()}]}).encode()
    header = json.dumps({
        "inputs": [{"name": "input", "shape": [1, 64], "datatype": "FP32",
                    "parameters": {"binary_data_size": values.nbytes}}],
        "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                    {"name": "probabilities", "parameters": {"binary_data": True}}],
    }).encode()
    (folder / "json.body").write_bytes(as_json)
    (folder / "binary.body").write_bytes(header + values.tobytes())
    return {"json": (folder / "json.body", None), "binary": (folder / "binary.body",
                                                             len(header))}


def wait_http(port: int, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready",
                                        timeout=1.0) as answer:
                if answer.status == 200:
                    return
        except (OSError, urllib.error.URLError):
            pass
        time.sleep(0.2)
    raise TimeoutError(f"HTTP on port {port} not ready after {timeout_s:g} s")


def http_step(server: ServerProcess, port: int, body: tuple[Path, int | None],
              args: argparse.Namespace) -> dict[str, Any]:
    path, header_length = body
    argv = pinned([sys.executable, "-m", "bench.studies.http_load", "--port", str(port),
                   "--body", str(path), "--concurrency", str(CONCURRENCY),
                   "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                   "--server-pid", str(server.pid),
                   *(["--header-length", str(header_length)] if header_length else [])],
                  args.client_cpus)
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"http_load failed:\n{done.stderr[-2000:]}")
    figures: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    cpu = figures.pop("server_cpu_s")
    figures["server_cpu_us_per_request"] = round(cpu * 1e6 / figures["requests"], 1) \
        if cpu is not None and figures["requests"] else None
    return figures


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="http-server-bench-"))
    try:
        repo = comparison_repository(ensure_examples([MODEL]), folder / "models", [MODEL],
                                     batching=True)
        payloads = bodies(folder)
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            shift = repeat % len(args.candidates)
            for candidate in args.candidates[shift:] + args.candidates[:shift]:
                grpc_port, http_port = free_port(), free_port()
                argv = [sys.executable, "-m", "bench.studies.http_candidates", candidate,
                        "--model-repository", str(repo), "--grpc-port", str(grpc_port),
                        "--http-port", str(http_port)]
                with ServerProcess(candidate, argv, grpc_port, args.server_cpus,
                                   cwd=REPO_ROOT) as server:
                    wait_http(http_port)
                    for body in BODIES:
                        run = {"server": candidate, "body": body, "repeat": repeat + 1,
                               **http_step(server, http_port, payloads[body], args)}
                        runs.append(run)
                        report(run)
                    if candidate == "httptools":
                        run = {"server": "grpc", "body": "grpc unary", "repeat": repeat + 1,
                               **drive(server, MODEL, "unary", CONCURRENCY, args.seconds,
                                       args.warmup, folder / "grpc.json",
                                       client_cpus=args.client_cpus)}
                        runs.append(run)
                        report(run)
        return runs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def report(run: dict[str, Any]) -> None:
    cpu = run["server_cpu_us_per_request"]
    print(f"{run['server']:>9} {run['body']:>10} #{run['repeat']}: "
          f"{run['throughput_rps']:,.0f} infer/s, p50 {run['p50_ms']} ms, server CPU "
          f"{'n/a' if cpu is None else f'{cpu:.0f}'} us/req, errors {run['errors']}",
          file=sys.stderr, flush=True)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for key in dict.fromkeys((r["server"], r["body"]) for r in runs):
        mine = [r for r in runs if (r["server"], r["body"]) == key]

        def median(name: str, mine: list[dict[str, Any]] = mine) -> float | None:
            values = [r[name] for r in mine if r[name] is not None]
            return float(statistics.median(values)) if values else None

        rows.append({"server": key[0], "body": key[1],
                     "throughput_rps": median("throughput_rps"), "p50_ms": median("p50_ms"),
                     "p99_ms": median("p99_ms"),
                     "server_cpu_us_per_request": median("server_cpu_us_per_request"),
                     "errors": sum(r["errors"] for r in mine), "runs": len(mine)})
    return rows


LABELS = {"httptools": "own asyncio protocol + httptools", "aiohttp": "aiohttp web.Server",
          "uvicorn": "uvicorn (httptools) + raw ASGI", "grpc": "gRPC (reference)"}


def write_section(document: dict[str, Any]) -> None:
    lines = section_header(SECTION, document)
    lines += [
        f"Server on CPU {document['server_cpus']} (one ONNX Runtime thread), load on CPU "
        f"{document['client_cpus']}: {CONCURRENCY} keep-alive connections in a closed loop "
        f"(bench/studies/http_load.py), {document['seconds']} s per step after "
        f"{document['warmup']} s warm-up, medians of {document['repeats']} runs in rotating "
        f"order; model {MODEL}, one row per request. 1-minute load average "
        f"{document['load_average_start']} at start, {document['load_average_end']} at the "
        "end (2 cores: other work on the machine lowers every figure). Every candidate "
        "carries the same REST gateway (server/rest/gateway.py) to the same handlers; "
        "server CPU per request is the server process's over the measured window.", "",
        "| server | body | infer/s | p50 ms | p99 ms | server CPU us/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        cpu = row["server_cpu_us_per_request"]
        lines.append(
            f"| {LABELS.get(row['server'], row['server'])} | {row['body']} | "
            f"{row['throughput_rps']:,.0f} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{'n/a' if cpu is None else f'{cpu:.0f}'} | {row['errors']} |")
    lines += ["", f"Chart: [http_server.png](results/{RESULTS_PNG.name})", ""]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, repeats=2)
    parser.add_argument("--candidates", default=",".join(CANDIDATES))
    args = parser.parse_args(argv)
    args.candidates = [c for c in args.candidates.split(",") if c]
    started = time.monotonic()
    load_start = round(os.getloadavg()[0], 2)
    runs = measure(args)
    rows = summarise(runs)
    document = {
        "benchmark": "http_server",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.studies.http_server "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(None),
        "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
        "server_cpus": args.server_cpus, "client_cpus": args.client_cpus,
        "load_average_start": load_start, "load_average_end": round(os.getloadavg()[0], 2),
        "rows": rows, "runs": runs, "wall_s": round(time.monotonic() - started, 1),
    }
    write_document(RESULTS_JSON, document)
    servers = [s for s in dict.fromkeys(r["server"] for r in rows) if s != "grpc"]
    series = {body: [next((r["server_cpu_us_per_request"] or 0.0 for r in rows
                           if r["server"] == s and r["body"] == body), 0.0) for s in servers]
              for body in BODIES}
    grpc_row = next((r for r in rows if r["server"] == "grpc"), None)
    title = f"{MODEL}, {CONCURRENCY} in flight"
    if grpc_row is not None and grpc_row["server_cpu_us_per_request"] is not None:
        title += f" (gRPC unary: {grpc_row['server_cpu_us_per_request']:.0f} us/req)"
    grouped_bars(RESULTS_PNG, [LABELS.get(s, s) for s in servers], series,
                 "server CPU us per request", title)
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
