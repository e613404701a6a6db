"""Several frontends (``--frontends N``): what the process boundary costs and what batches form.

``peregrine serve`` on the example ``mlp_classifier`` (one ONNX Runtime thread, spinning off,
the example's batching), one process (``--frontends 1``) or an engine with N frontend
processes, all of the server pinned to ``--server-cpus``; ``peregrine bench run`` with
``--client-processes`` load processes (each its own connection, so the kernel spreads them
over the frontends) pinned to ``--client-cpus``, 64 requests in flight, unary and streaming.
Reported per set-up and RPC: infer/s, p50/p99, the server's CPU per request summed over its
process tree (engine and frontends, from /proc), and the batch sizes the engine formed
(ModelStatistics' batch statistics over the step: with several frontends, batches that hold
requests from more than one of them). A last step sends requests of 1 MiB each (unary, 8 in
flight) to a model that returns them (``echo_1mib``, built here): with frontends, requests and
answers cross between the processes in the arenas (``2-socket``: over the sockets).

Goal (issue 15): the process boundary adds at most 25 us of CPU per request over one
process. On a 2-core machine nothing runs in parallel (the server has one core); the
throughput goal (0.8 x N x one frontend) needs a machine with more cores than frontends.

    python -m bench.studies.frontends [--frontends 1,2,2-socket] [--seconds 4] [--repeats 2]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from bench.compare.model_repo import ORT_PARAMETERS, comparison_repository, ensure_examples
from bench.compare.servers import PeregrineProcess, ServerProcess, pinned
from bench.loadgen.cpu import process_cpu_s, tree_cpu_s
from bench.loadgen.environment import REPO_ROOT, environment
from bench.results_md import RESULTS_DIR, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.bench_run import drive
from bench.studies.study_run import publish, study_arguments

SECTION = "## Frontend processes: the cost of the process boundary"
RESULTS_JSON = RESULTS_DIR / "frontends.json"
RESULTS_PNG = RESULTS_DIR / "frontends.png"
MODEL = "mlp_classifier"
#: ModelInfer unary and streaming, and ModelReady (bench/studies/ready_load.py): no batching
#: and no model, so its CPU per call is the per-call path alone, the boundary's cost included.
RPCS = ("unary", "stream", "ready", "unary_1mib")
CONCURRENCY = 64
#: The large-message step: FP32 [262144] (1 MiB) in and the same out, 8 in flight.
LARGE_MODEL = "echo_1mib"
LARGE_ELEMENTS = 262_144
LARGE_CONCURRENCY = 8
IPC_GOAL_US = 25.0


def add_large_model(repo: Path) -> None:
    """``LARGE_MODEL`` in ``repo``: one request is 1 MiB of input and its answer the same
    bytes (ONNX Identity), so the step's cost is moving messages."""
    import onnx
    from onnx import TensorProto, helper

    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", LARGE_ELEMENTS])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", LARGE_ELEMENTS])]
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], LARGE_MODEL,
                              inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    (repo / LARGE_MODEL / "1").mkdir(parents=True)
    onnx.save(model, repo / LARGE_MODEL / "1" / "model.onnx")
    parameters = "".join(f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
                         for k, v in ORT_PARAMETERS.items())
    (repo / LARGE_MODEL / "config.pbtxt").write_text(
        f'name: "{LARGE_MODEL}"\nplatform: "onnxruntime_onnx"\nmax_batch_size: 8\n'
        f'input [ {{ name: "x" data_type: TYPE_FP32 dims: [ {LARGE_ELEMENTS} ] }} ]\n'
        f'output [ {{ name: "y" data_type: TYPE_FP32 dims: [ {LARGE_ELEMENTS} ] }} ]\n'
        f'dynamic_batching {{ }}\n{parameters}', encoding="utf-8")


def batch_counts(url: str, model: str) -> dict[int, int]:
    """Executions per batch size so far (ModelStatistics, every version of the model)."""
    with grpcclient.InferenceServerClient(url) as client:
        stats = client.get_inference_statistics(model)
    counts: dict[int, int] = {}
    for version in stats.model_stats:
        for batch in version.batch_stats:
            counts[batch.batch_size] = counts.get(batch.batch_size, 0) + batch.compute_infer.count
    return counts


def ready_step(server: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    """ModelReady in a closed loop at CONCURRENCY, from the client CPUs."""
    argv = pinned([sys.executable, "-m", "bench.studies.ready_load", "--url", server.url,
                   "--model", MODEL, "--server-pid", str(server.pid),
                   "--concurrency", str(CONCURRENCY), "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup)], args.client_cpus)
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"ModelReady load failed:\n{done.stderr[-2000:]}")
    figures = json.loads(done.stdout)
    return {"throughput_rps": round(figures["calls_per_s"], 1), "p50_ms": None,
            "p99_ms": None, "server_cpu_us_per_request": figures["server_cpu_us_per_call"],
            "root_cpu_us_per_request": figures["root_cpu_us_per_call"],
            "errors": 0, "batches": {}, "mean_batch": None}


def step(server: ServerProcess, rpc: str, args: argparse.Namespace,
         out: Path) -> dict[str, Any]:
    if rpc == "ready":
        return ready_step(server, args)
    model, kind, concurrency = (LARGE_MODEL, "unary", LARGE_CONCURRENCY) \
        if rpc == "unary_1mib" else (MODEL, rpc, CONCURRENCY)
    before = batch_counts(server.url, model)
    tree_before, root_before = tree_cpu_s(server.pid), process_cpu_s(server.pid)
    figures = drive(server, model, kind, concurrency, args.seconds, args.warmup, out,
                    ("--processes", str(args.client_processes)), args.client_cpus)
    tree_after, root_after = tree_cpu_s(server.pid), process_cpu_s(server.pid)
    after = batch_counts(server.url, model)
    # The root process's share of the tree's CPU over the whole drive (warm-up included),
    # applied to the tree's CPU per request over the measured step: the engine's own.
    if tree_before is None or root_before is None or tree_after is None \
            or root_after is None or figures["server_cpu_us_per_request"] is None:
        raise RuntimeError("cannot read the server's CPU time")
    share = (root_after - root_before) / max(tree_after - tree_before, 1e-9)
    figures["root_cpu_us_per_request"] = round(share * figures["server_cpu_us_per_request"], 1)
    batches = {size: after.get(size, 0) - before.get(size, 0) for size in after}
    executions = sum(batches.values())
    rows = sum(size * count for size, count in batches.items())
    figures["batches"] = {str(k): v for k, v in sorted(batches.items()) if v}
    figures["mean_batch"] = round(rows / executions, 2) if executions else None
    return figures


def setup_arguments(setup: str) -> tuple[str, ...]:
    """``peregrine serve`` arguments of a set-up: N frontends, or ``N-socket`` for N
    frontends without the request arena (every request over the frontends' sockets)."""
    count, _, variant = setup.partition("-")
    if variant not in ("", "socket"):
        raise ValueError(f"a set-up is N or N-socket, got {setup!r}")
    return ("--frontends", count) + (("--frontend-arena-bytes", "0") if variant else ())


def measure(args: argparse.Namespace) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="frontends-bench-"))
    try:
        repo = comparison_repository(ensure_examples([MODEL]), folder / "models", [MODEL],
                                     batching=True)
        add_large_model(repo)
        runs: list[dict[str, Any]] = []
        for repeat in range(args.repeats):
            order = args.frontends[repeat % len(args.frontends):] \
                + args.frontends[:repeat % len(args.frontends)]
            for count in order:
                with PeregrineProcess(repo, cpus=args.server_cpus,
                                      extra_args=setup_arguments(count)) as server:
                    for rpc in RPCS:
                        figures = step(server, rpc, args, folder / f"{count}-{rpc}.json")
                        run = {"frontends": count, "rpc": rpc, "repeat": repeat + 1, **figures}
                        runs.append(run)
                        print(f"frontends {count} {rpc:>6} #{repeat + 1}: "
                              f"{run['throughput_rps']:,.0f} infer/s, server CPU "
                              f"{run['server_cpu_us_per_request']} us/req, mean batch "
                              f"{run['mean_batch']}, errors {run['errors']}",
                              file=sys.stderr, flush=True)
        return runs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise(runs: list[dict[str, Any]], counts: Sequence[str]) -> list[dict[str, Any]]:
    rows = []
    for rpc in RPCS:
        base: float | None = None
        for count in counts:
            mine = [r for r in runs if r["rpc"] == rpc and r["frontends"] == count]

            def median(key: str, mine: list[dict[str, Any]] = mine) -> float | None:
                values = [r[key] for r in mine if r[key] is not None]
                return float(statistics.median(values)) if values else None

            cpu = median("server_cpu_us_per_request")
            assert cpu is not None
            base = cpu if base is None else base
            batches: dict[str, int] = {}
            for run in mine:
                for size, n in run["batches"].items():
                    batches[size] = batches.get(size, 0) + n
            rows.append({
                "rpc": rpc, "frontends": count, "throughput_rps": median("throughput_rps"),
                "p50_ms": median("p50_ms"), "p99_ms": median("p99_ms"),
                "server_cpu_us_per_request": cpu, "extra_cpu_us": cpu - base,
                "root_cpu_us_per_request": median("root_cpu_us_per_request"),
                "mean_batch": median("mean_batch"), "batches": batches,
                "errors": sum(r["errors"] for r in mine)})
    return rows


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _engine(row: dict[str, Any]) -> str:
    """The engine's CPU per request and the rate that would fill a core of its own (with
    frontends; one process has no engine of its own)."""
    root = row.get("root_cpu_us_per_request")
    if str(row["frontends"]) == "1" or not root:
        return "— | —"
    return f"{root:.1f} | {1e6 / root:,.0f}"


def _arena_line(rows: list[dict[str, Any]]) -> list[str]:
    """What the arenas save on 1 MiB messages: N frontends against N-socket, same run."""
    large = {str(r["frontends"]): r for r in rows if r["rpc"] == "unary_1mib"}
    pairs = [(n, large[n], large[f"{n}-socket"]) for n in large if f"{n}-socket" in large]
    return ["", "1 MiB messages, through the arenas against over the sockets: " + "; ".join(
        f"--frontends {n}: {arena['extra_cpu_us']:+.0f} against {socket['extra_cpu_us']:+.0f} "
        f"us of CPU per request over one process, {arena['throughput_rps']:,.0f} against "
        f"{socket['throughput_rps']:,.0f} infer/s" for n, arena, socket in pairs) + "."
            ] if pairs else []


def section(document: dict[str, Any]) -> str:
    lines = section_header(SECTION, document)
    lines += [
        f"All of the server on CPU {document['server_cpus']} (one ONNX Runtime thread), "
        f"`peregrine bench run` with {document['client_processes']} load processes on CPU "
        f"{document['client_cpus']}, {CONCURRENCY} requests in flight, "
        f"{document['seconds']} s per step after {document['warmup']} s warm-up, medians of "
        f"{document['repeats']} runs in rotating order; model {MODEL}; `unary_1mib`: requests "
        f"of 1 MiB to `{LARGE_MODEL}` (answers of 1 MiB), {LARGE_CONCURRENCY} in flight. "
        "Server CPU per request: "
        "the CPU of the server's whole process tree (engine and frontends) over the step, "
        "divided by the requests answered. `--frontends 1` is the single process; `2-socket` "
        "is two frontends with `--frontend-arena-bytes 0` (every request over the sockets). "
        "Engine us/req: the engine process's share of the tree's CPU over the step, times "
        "the tree's CPU per request; the engine ceiling is the rate at which that would fill "
        "a core of its own (the requests/s no number of frontends can pass at this batch "
        "size, on this machine).",
        "",
        "| rpc | --frontends | infer/s | p50 ms | p99 ms | server CPU us/req | "
        "vs one process | engine us/req | engine ceiling req/s | mean batch | errors |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['rpc']} | {row['frontends']} | {row['throughput_rps']:,.0f} | "
            f"{_ms(row['p50_ms'])} | {_ms(row['p99_ms'])} | "
            f"{row['server_cpu_us_per_request']:.1f} | {row['extra_cpu_us']:+.1f} | "
            f"{_engine(row)} | {row['mean_batch'] or '—'} | {row['errors']} |")
    # The N-socket set-ups are for comparison: the goal is the server's own set-ups'.
    worst = max((r["extra_cpu_us"] for r in document["rows"]
                 if not str(r["frontends"]).endswith("-socket")), default=0.0)
    lines += [
        "", f"Goal: the process boundary adds at most {IPC_GOAL_US:g} us of CPU per request — "
        + ("met" if worst <= IPC_GOAL_US else f"**not met** (up to {worst:+.0f} us)")
        + ". With one core for the whole server, the frontends cannot add throughput here; "
        "the throughput goal needs a host with a core per frontend and one for the engine.",
        *_arena_line(document["rows"]),
        "", "Batch sizes the engine formed (executions per size, all runs): "
        + "; ".join(f"{r['rpc']} --frontends {r['frontends']}: {r['batches']}"
                    for r in document["rows"]), "",
        f"Chart: [frontends.png](results/{RESULTS_PNG.name})", "",
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, repeats=2)
    parser.add_argument("--frontends", default="1,2,2-socket",
                        help="the --frontends of each set-up (1: one process; N-socket: "
                        "N frontends without the request arena)")
    parser.add_argument("--client-processes", type=int, default=2)
    args = parser.parse_args(argv)
    args.frontends = [v for v in args.frontends.split(",") if v]
    for setup in args.frontends:
        setup_arguments(setup)
    started = time.monotonic()
    runs = measure(args)
    rows = summarise(runs, args.frontends)
    document = {
        "benchmark": "frontends",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.studies.frontends "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(None),
        "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
        "client_processes": args.client_processes, "server_cpus": args.server_cpus,
        "client_cpus": args.client_cpus, "rows": rows, "runs": runs,
        "wall_s": round(time.monotonic() - started, 1),
    }
    publish(RESULTS_JSON, document, lambda: grouped_bars(
        RESULTS_PNG, [f"{r['rpc']}\n--frontends {r['frontends']}" for r in rows],
        {"server CPU us/req": [r["server_cpu_us_per_request"] for r in rows]},
        "server CPU us per request", f"{MODEL}, {CONCURRENCY} in flight"),
        None if args.no_results_md else section)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
