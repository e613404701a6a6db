"""Peregrine's own cost per request, next to the bare grpc.aio servicer and the plain-Python
batching server, against its targets.

For each model (mlp_classifier, cnn) and RPC (unary, stream), at 1 and 64 requests in flight,
one run drives the no-op grpc.aio servicer (bench/compare/noop_server.py, the floor), the
plain-Python batching server (bench/compare/plain_server.py, the yardstick the compiled path
must beat) and Peregrine serving the example models (batching on, one ONNX Runtime thread,
spinning off), each pinned to CPU 0 with the generator on CPU 1, and measures ONNX Runtime
in-process on CPU 0 at batch sizes 1..64. Then, per step:

- overhead per request = 1/ours - 1/floor - in-process time per sample at the mean batch
  Peregrine formed (interpolated between the measured batch sizes);
- the same from server CPU per request (independent of a client-bound floor);
- bound = 1 / (in-process time per sample + 1/floor);
- at 1 in flight, the p50 target: 1.25 x (floor p50 + in-process batch-1 time), and no more
  than the plain-Python server's p50;
- against the plain-Python server: 1.3 x its infer/s for the MLP, 1.1 x for the CNN;
- where each server's CPU went, by thread: the event loop (main) thread, gRPC's completion
  queue poller, gRPC's event-engine threads, the rest;
- where a unary request's time goes inside Peregrine at 64 in flight: the same load against
  the server cut short after each stage of the request path (bench/studies/ablation_server.py:
  respond, codec, execute, full).

    python -m bench.studies.frontend_overhead [--duration 3 --warmup 1 --repeats 3]

Writes bench/results/frontend_overhead.json, bench/results/frontend_overhead.png and the
"Frontend overhead" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import itertools
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare.ceiling import ort_ceiling
from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.compare.scenario import Scenario, drive, temp_folder, write_input_files
from bench.compare.servers import NoopServer, PeregrineProcess, PlainServer, ServerProcess
from bench.loadgen.cli import exit_on_sigterm
from bench.loadgen.environment import environment
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies import perf_analyzer
from bench.studies.ablation_server import STAGES
from bench.studies.bar_chart import grouped_bars
from bench.studies.inprocess_path import measure as measure_in_process

SECTION = ("## Frontend overhead per request: Peregrine against the no-op floor, the plain-Python "
           "batching server and the model in-process")
RESULTS_JSON = RESULTS_DIR / "frontend_overhead.json"
RESULTS_PNG = RESULTS_DIR / "frontend_overhead.png"
MODELS = ("mlp_classifier", "cnn")
RPCS = ("unary", "stream")
CONCURRENCY = (1, 64)
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
#: The targets: against the plain-Python batching server (the compiled path must beat the
#: plain version of itself), the bare servicer and the inference+transport bound.
MLP_VS_PLAIN = 1.3
MLP_UNARY_SHARE = 0.85
MLP_STREAM_SHARE = 0.75
CNN_VS_PLAIN = 1.1
CNN_BOUND_SHARE = 0.90
P50_FACTOR = 1.25
_TICKS = os.sysconf("SC_CLK_TCK")


def thread_ticks(pid: int) -> dict[int, tuple[str, int]]:
    """CPU ticks (user + system) of every thread of ``pid``, with its name."""
    ticks: dict[int, tuple[str, int]] = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/stat", encoding="ascii") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{pid}/task/{tid}/comm", encoding="ascii") as comm:
                name = comm.read().strip()
        except OSError:
            continue  # the thread ended
        ticks[int(tid)] = (name, int(fields[11]) + int(fields[12]))
    return ticks


def thread_split(pid: int, before: dict[int, tuple[str, int]],
                 after: dict[int, tuple[str, int]]) -> dict[str, float]:
    """Seconds of CPU per thread group between two snapshots."""
    groups: dict[str, float] = {}
    for tid, (name, total) in after.items():
        used = (total - before.get(tid, (name, 0))[1]) / _TICKS
        if tid == pid:
            group = "event loop (main thread)"
        elif name.startswith("event_engine"):
            group = "gRPC event engine"
        elif name.startswith("exec-"):
            group = "model worker threads"
        elif used > 0 and name in ("python", "peregrine", "python3"):
            group = "gRPC poller and other Python threads"
        else:
            group = "other"
        groups[group] = groups.get(group, 0.0) + used
    return {k: v for k, v in groups.items() if v > 0}


class Generator:
    """The load: ``peregrine bench run`` (the default) or perf_analyzer when given its binary."""

    def __init__(self, perf_analyzer: Path | None, folder: Path) -> None:
        self.perf_analyzer = perf_analyzer
        self._folder = folder
        self._data: dict[Path, Path] = {}

    @property
    def name(self) -> str:
        return "perf_analyzer" if self.perf_analyzer is not None else "peregrine bench run"

    def drive(self, server: ServerProcess, key: str, model: str, rpc: str, input_file: Path,
              scenario: Scenario, label: str) -> dict[str, Any] | None:
        if self.perf_analyzer is None:
            return drive(server, key, model, rpc, input_file, scenario, label)
        if input_file not in self._data:
            self._data[input_file] = perf_analyzer.input_json(
                input_file, self._folder / f"{input_file.stem}.json")
        print(f"  {label}: {model} {rpc} (perf_analyzer) ...", file=sys.stderr, flush=True)
        steps = []
        for concurrency in scenario.concurrency:
            try:
                steps.append(perf_analyzer.step(
                    self.perf_analyzer, server.url, model, rpc, concurrency,
                    self._data[input_file], server.pid, scenario.generator_cpus,
                    measurement_ms=int(scenario.duration_s * 1000)))
            except RuntimeError as exc:
                print(f"    failed: {exc}", file=sys.stderr)
                return None
        return {"steps": steps, "server": {"pid": server.pid}}

    def drive_with_threads(self, server: ServerProcess, key: str, model: str, rpc: str,
                           input_file: Path, scenario: Scenario,
                           label: str) -> tuple[dict[str, Any] | None, dict[str, float]]:
        before = thread_ticks(server.pid)
        document = self.drive(server, key, model, rpc, input_file, scenario, label)
        return document, thread_split(server.pid, before, thread_ticks(server.pid))


def perf_analyzer_binary(choice: str) -> Path | None:
    """The perf_analyzer to drive the load with, or None for ``peregrine bench run``."""
    if choice == "peregrine":
        return None
    found = perf_analyzer.find()
    if found is None and choice == "perf_analyzer":
        raise SystemExit("perf_analyzer is not installed: "
                         "python -m bench.studies.perf_analyzer install")
    return found


def per_sample_us(ceiling: dict[str, Any], batch: float) -> float:
    """In-process microseconds per sample at ``batch`` rows, linear between measured sizes."""
    points = sorted((int(b), m["us_per_run"] / int(b)) for b, m in ceiling.items())
    if batch <= points[0][0]:
        return points[0][1]
    for (b0, u0), (b1, u1) in itertools.pairwise(points):
        if batch <= b1:
            return u0 + (u1 - u0) * (batch - b0) / (b1 - b0)
    return points[-1][1]


def step_at(document: dict[str, Any] | None, concurrency: int) -> dict[str, Any] | None:
    if document is None:
        return None
    return next((s for s in document["steps"] if s["concurrency"] == concurrency), None)


def figures(ours: dict[str, Any], floor: dict[str, Any], plain: dict[str, Any] | None,
            ceiling: dict[str, Any]) -> dict[str, Any]:
    """The yardsticks of one (model, rpc, concurrency) step."""
    split = ours.get("server_split") or {}
    batch = float(split.get("mean_batch_rows") or 1.0)
    inference_us = per_sample_us(ceiling, batch)
    ours_us = 1e6 / ours["throughput_rps"]
    floor_us = 1e6 / floor["throughput_rps"]
    ours_cpu = (ours.get("server_cpu") or {}).get("us_per_request")
    floor_cpu = (floor.get("server_cpu") or {}).get("us_per_request")
    return {
        "ours_rps": ours["throughput_rps"],
        "floor_rps": floor["throughput_rps"],
        "floor_bound_by": floor.get("bound"),
        "ours_p50_ms": ours["latency_ms"]["p50"],
        "ours_p99_ms": ours["latency_ms"]["p99"],
        "floor_p50_ms": floor["latency_ms"]["p50"],
        "mean_batch": batch,
        "inference_us_per_sample": inference_us,
        "overhead_us": ours_us - floor_us - inference_us,
        "overhead_cpu_us": (ours_cpu - floor_cpu - inference_us
                            if ours_cpu is not None and floor_cpu is not None else None),
        "vs_floor": ours["throughput_rps"] / floor["throughput_rps"],
        "bound_rps": 1e6 / (inference_us + floor_us),
        "vs_bound": ours["throughput_rps"] * (inference_us + floor_us) / 1e6,
        "p50_target_ms": P50_FACTOR * (floor["latency_ms"]["p50"]
                                       + per_sample_us(ceiling, 1.0) / 1e3),
        "plain_rps": plain["throughput_rps"] if plain else None,
        "plain_p50_ms": plain["latency_ms"]["p50"] if plain else None,
        "vs_plain": ours["throughput_rps"] / plain["throughput_rps"] if plain else None,
    }


def verdicts(cases: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """Each target with the measured figure and whether it was reached."""
    rows: list[dict[str, Any]] = []

    def add(key: str, target: str, value: float, limit: float, higher_is_better: bool,
            unit: str) -> None:
        reached = value >= limit if higher_is_better else value <= limit
        rows.append({"case": key, "target": target, "measured": value, "limit": limit,
                     "unit": unit, "reached": reached})

    for key, f in cases.items():
        model, rpc, concurrency = key.split("/")
        mlp = model == "mlp_classifier"
        if concurrency == "1":
            if not mlp:
                continue
            add(key, f"p50 <= {P50_FACTOR} x (floor p50 + in-process batch 1)",
                f["ours_p50_ms"], f["p50_target_ms"], False, "ms")
            if f["plain_p50_ms"] is not None:
                add(key, "p50 <= the plain-Python server's", f["ours_p50_ms"],
                    f["plain_p50_ms"], False, "ms")
            continue
        if f["vs_plain"] is not None:
            share = MLP_VS_PLAIN if mlp else CNN_VS_PLAIN
            add(key, f">= {share} x the plain-Python server's infer/s", f["vs_plain"], share,
                True, "x plain")
        if mlp:
            share = MLP_UNARY_SHARE if rpc == "unary" else MLP_STREAM_SHARE
            add(key, f">= {share:.0%} of the bare servicer's infer/s", f["vs_floor"], share,
                True, "x floor")
        else:
            add(key, f">= {CNN_BOUND_SHARE:.0%} of 1 / (in-process + bare servicer)",
                f["vs_bound"], CNN_BOUND_SHARE, True, "x bound")
    return rows


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    models = tuple(args.models.split(","))
    scenario = Scenario(models=models, rpcs=RPCS, concurrency=CONCURRENCY,
                        duration_s=args.duration, warmup_s=args.warmup, repeats=args.repeats)
    load_average = os.getloadavg()[0]
    examples = ensure_examples(models)
    print("in-process ONNX Runtime ...", file=sys.stderr, flush=True)
    ceiling = ort_ceiling(examples, models, BATCH_SIZES, seconds=0.5, repeats=3,
                          cpus=scenario.server_cpus)["models"]
    runs: dict[str, dict[str, Any]] = {}
    threads: dict[str, dict[str, dict[str, float]]] = {}
    with temp_folder("bench-overhead-") as folder:
        generator = Generator(perf_analyzer_binary(args.generator), Path(folder))
        inputs = write_input_files(examples, models, Path(folder))
        repository = comparison_repository(examples, Path(folder) / "repo", models, True)
        servers: list[tuple[str, str, ServerProcess]] = [
            ("floor", "no-op grpc.aio servicer",
             NoopServer(cpus=scenario.server_cpus, repository=repository)),
            ("plain", "plain-Python batching server",
             PlainServer(repository, cpus=scenario.server_cpus)),
            ("peregrine", "peregrine", PeregrineProcess(repository, cpus=scenario.server_cpus,
                                                        name="overhead-peregrine")),
        ]
        for key, label, process in servers:
            with process as server:
                for model in models:
                    for rpc in RPCS:
                        document, split = generator.drive_with_threads(
                            server, f"overhead-{key}", model, rpc, inputs[model], scenario,
                            label)
                        if document is not None:
                            runs[f"{key}/{model}/{rpc}"] = document
                            threads[f"{key}/{model}/{rpc}"] = split
        ablation = run_ablation(repository, models, inputs, scenario)
        print("in-process request path ...", file=sys.stderr, flush=True)
        in_process = measure_in_process(
            repository, inputs, [int(c) for c in scenario.server_cpus.split(",")])
        for model, stages in in_process.items():
            for stage, cpu_us in stages.items():
                if stage in ablation.get(model, {}):
                    ablation[model][stage]["in_process_cpu_us"] = cpu_us
    cases: dict[str, dict[str, Any]] = {}
    for model in models:
        for rpc in RPCS:
            for concurrency in CONCURRENCY:
                ours = step_at(runs.get(f"peregrine/{model}/{rpc}"), concurrency)
                floor = step_at(runs.get(f"floor/{model}/{rpc}"), concurrency)
                plain = step_at(runs.get(f"plain/{model}/{rpc}"), concurrency)
                if ours is not None and floor is not None:
                    cases[f"{model}/{rpc}/{concurrency}"] = figures(
                        ours, floor, plain, ceiling[model])
    server_pid = next(iter(runs.values()))["server"]["pid"] if runs else None
    return {
        "benchmark": "frontend_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(server_pid),
        "load_average_1m": load_average,
        "scenario": scenario.as_dict(),
        "generator": generator.name,
        "in_process": ceiling,
        "cases": cases,
        "threads": threads,
        "verdicts": verdicts(cases),
        "ablation": ablation,
    }


#: What each ablation stage adds to the one before it.
STAGE_ADDS = {
    "respond": "gRPC + Peregrine's servicer, a cached response (no per-request work)",
    "codec": "decode the request, encode the response",
    "execute": "validate, pack, ONNX Runtime, unpack, build the response (no queue)",
    "full": "routing, queue and batcher, futures, statistics (Peregrine as shipped)",
}


def run_ablation(repository: Path, models: Sequence[str], inputs: dict[str, Path],
                 scenario: Scenario) -> dict[str, dict[str, Any]]:
    """Unary at 64 in flight against the server cut after each stage: per model, per
    stage, infer/s and microseconds per request (wall and server CPU)."""
    at64 = Scenario(models=scenario.models, rpcs=("unary",), concurrency=(64,),
                    duration_s=scenario.duration_s, warmup_s=scenario.warmup_s,
                    repeats=scenario.repeats, server_cpus=scenario.server_cpus,
                    generator_cpus=scenario.generator_cpus)
    results: dict[str, dict[str, Any]] = {model: {} for model in models}
    for stage in STAGES:
        launcher = ("-m", "bench.studies.ablation_server", "--stage", stage)
        with PeregrineProcess(repository, cpus=scenario.server_cpus,
                              name=f"ablation-{stage}", launcher=launcher) as server:
            for model in models:
                # Our own generator here: perf_analyzer insists on ModelStatistics for the
                # model, which the cut-short stages (no batcher) do not keep.
                document = drive(server, f"ablation-{stage}", model, "unary", inputs[model],
                                 at64, f"ablation: {stage}")
                step = step_at(document, 64)
                if step is None:
                    continue
                cpu = (step.get("server_cpu") or {}).get("us_per_request")
                results[model][stage] = {"rps": step["throughput_rps"],
                                         "us_per_request": 1e6 / step["throughput_rps"],
                                         "cpu_us_per_request": cpu}
    return results


def load_description(report: dict[str, Any]) -> str:
    scenario = report["scenario"]
    if report.get("generator") == "perf_analyzer":
        return (f"perf_analyzer (C++, tritonclient 2.40.0), {scenario['duration_s']} s "
                "measurement windows until three agree within 10%; streams: one stream per "
                "request in flight; server CPU per request from its process CPU over the "
                "whole step at the reported rate")
    return (f"`peregrine bench run` (one process), {scenario['duration_s']} s per step after "
            f"{scenario['warmup_s']} s warm-up, median of {scenario['repeats']} repeats; "
            "streams: all requests in flight on one stream")


def markdown(report: dict[str, Any]) -> str:
    scenario = report["scenario"]
    lines = [
        *section_header(SECTION, report),
        f"Closed loop; {load_description(report)}; servers on CPU "
        f"{scenario['server_cpus']}, generator on CPU "
        f"{scenario['generator_cpus']}; 1-minute load average at start "
        f"{report['load_average_1m']:.2f}. Overhead = 1/ours - 1/floor - in-process time per "
        "sample at Peregrine's mean batch; 'CPU overhead' is the same from server CPU per "
        "request, which a client-bound floor does not distort.", "",
        "| model | rpc | c | peregrine infer/s (p50 / p99 ms) | floor infer/s (p50 ms) | "
        "plain-Python infer/s (p50 ms) | mean batch | in-process us/sample | overhead us | "
        "CPU overhead us | vs plain | vs floor | vs bound |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, f in report["cases"].items():
        model, rpc, concurrency = key.split("/")
        cpu = f["overhead_cpu_us"]
        floor_note = " (client-bound)" if f["floor_bound_by"] == "client" else ""
        plain = ("n/a" if f.get("plain_rps") is None
                 else f"{f['plain_rps']:,.0f} ({f['plain_p50_ms']:.2f})")
        vs_plain = "n/a" if f.get("vs_plain") is None else f"{f['vs_plain']:.2f}"
        lines.append(
            f"| {model} | {rpc} | {concurrency} | {f['ours_rps']:,.0f} "
            f"({f['ours_p50_ms']:.2f} / {f['ours_p99_ms']:.2f}) | {f['floor_rps']:,.0f} "
            f"({f['floor_p50_ms']:.2f}){floor_note} | {plain} | {f['mean_batch']:.1f} | "
            f"{f['inference_us_per_sample']:.1f} | {f['overhead_us']:.0f} | "
            f"{'n/a' if cpu is None else f'{cpu:.0f}'} | {vs_plain} | {f['vs_floor']:.2f} | "
            f"{f['vs_bound']:.2f} |")
    lines += ["", "Targets:", "", "| case | target | measured | limit | reached |",
              "|---|---|---:|---:|---|"]
    for v in report["verdicts"]:
        lines.append(f"| {v['case']} | {v['target']} | {v['measured']:.2f} {v['unit']} | "
                     f"{v['limit']:.2f} | {'yes' if v['reached'] else '**no**'} |")
    lines += ["", "Where the server's CPU went at 64 in flight (share of the process's CPU):", "",
              "| server | model | rpc | by thread |", "|---|---|---|---|"]
    for key, split in report["threads"].items():
        total = sum(split.values()) or 1.0
        parts = ", ".join(f"{name} {100 * used / total:.0f}%"
                          for name, used in sorted(split.items(), key=lambda kv: -kv[1]))
        server, model, rpc = key.split("/")
        lines.append(f"| {server} | {model} | {rpc} | {parts} |")
    lines += ["", "Where a unary request's time goes at 64 in flight: the same load "
              "(`peregrine bench run`, median of the repeats) against "
              "Peregrine cut short after each stage (`bench/studies/ablation_server.py`); "
              "each stage "
              "adds its row's work to the one above. 'In-process' runs the same stage's "
              "handler back to back in one process without gRPC (64 coroutines, "
              "`bench/studies/inprocess_path.py`, CPU time per request on the server's core; "
              "'full' "
              "forms full batches there):", "",
              "| model | stage | adds | infer/s | us per request | + us vs the stage above | "
              "in-process us | + in-process us |",
              "|---|---|---|---:|---:|---:|---:|---:|"]
    for model, stages in report.get("ablation", {}).items():
        previous: dict[str, Any] | None = None
        for stage, result in stages.items():
            inner = result.get("in_process_cpu_us")
            added = added_inner = ""
            if previous is not None:
                added = f"{result['us_per_request'] - previous['us_per_request']:+.0f}"
                if inner is not None and previous.get("in_process_cpu_us") is not None:
                    added_inner = f"{inner - previous['in_process_cpu_us']:+.1f}"
            lines.append(f"| {model} | {stage} | {STAGE_ADDS[stage]} | {result['rps']:,.0f} | "
                         f"{result['us_per_request']:.0f} | {added} | "
                         f"{'' if inner is None else f'{inner:.1f}'} | {added_inner} |")
            previous = result
    lines += ["", f"Chart: [frontend_overhead.png](results/{RESULTS_PNG.name})"]
    return "\n".join(lines) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    keys = [k for k in report["cases"] if k.endswith("/64")]
    grouped_bars(
        path, [k.rsplit("/", 1)[0] for k in keys],
        {label: [report["cases"][k].get(field) or 0 for k in keys]
         for field, label in (("floor_rps", "bare grpc.aio servicer"),
                              ("bound_rps", "bound: 1/(in-process + bare)"),
                              ("plain_rps", "plain-Python batching server"),
                              ("ours_rps", "peregrine"))},
        "infer/s at 64 in flight (server on one core)",
        "Peregrine vs the bare servicer, the bound and the plain-Python server")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.studies.frontend_overhead",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--generator", choices=["auto", "perf_analyzer", "peregrine"],
                        default="auto",
                        help="load generator: perf_analyzer (python -m bench.studies.perf_analyzer "
                             "install), peregrine bench run, or auto: perf_analyzer when "
                             "installed (default)")
    parser.add_argument("--no-results-md", action="store_true",
                        help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    command = " ".join(["python -m bench.studies.frontend_overhead", *(argv or sys.argv[1:])])
    report = run(args, command)
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    plot(report, RESULTS_PNG)
    text = markdown(report)
    print(text)
    if not args.no_results_md:
        replace_section(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
