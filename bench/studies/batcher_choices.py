"""Does what the batcher learned pay? The same load against Peregrine with its batching choices
switched one at a time.

Variants (model config parameters on top of the comparison settings: one ONNX Runtime thread,
spinning off, the example's dynamic batching):

- ``default``: the adaptive queue delay (hold a batch only while requests keep arriving) and
  inline execution of batches predicted under 100 us (run in the loop callback, no thread
  hand-off);
- ``no-inline``: ``inline_execution_max_us: 0``, every batch runs in the instance's thread;
- ``inline-1ms``: ``inline_execution_max_us: 1000``, batches up to 1 ms of CPU run on the loop
  (on a server pinned to one core a worker thread buys no parallelism, only hand-offs);
- ``fixed-delay``: ``queue_delay: fixed``, Triton's rule (hold every batch below its
  preferred size for the whole ``max_queue_delay_microseconds``).

Each variant serves the MLP and the CNN, unary and streaming, at 1 and 64 requests in flight
(closed loop, ``peregrine bench run`` pinned to CPU 1, the server to CPU 0, median of the
repeats). Writes ``bench/results/batcher_choices.json``, ``batcher_choices.png`` and the
"Batcher choices" section of ``bench/RESULTS.md``::

    python -m bench.studies.batcher_choices [--duration 2 --warmup 1 --repeats 3]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare.model_repo import ORT_PARAMETERS, comparison_repository, ensure_examples
from bench.compare.scenario import Scenario, drive, temp_folder, write_input_files
from bench.compare.servers import PeregrineProcess
from bench.loadgen.cli import exit_on_sigterm
from bench.loadgen.environment import environment
from bench.results_md import RESULTS_DIR, markdown_table, replace_section, section_header
from bench.studies.bar_chart import grouped_bars

SECTION = "## Batcher choices: adaptive queue delay and inline execution, on and off"
RESULTS_JSON = RESULTS_DIR / "batcher_choices.json"
RESULTS_PNG = RESULTS_DIR / "batcher_choices.png"
MODELS = ("mlp_classifier", "cnn")
RPCS = ("unary", "stream")
CONCURRENCY = (1, 64)
VARIANTS: dict[str, dict[str, str]] = {
    "default": {},
    "no-inline": {"inline_execution_max_us": "0"},
    "inline-1ms": {"inline_execution_max_us": "1000"},
    "fixed-delay": {"queue_delay": "fixed"},
}


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    scenario = Scenario(models=MODELS, rpcs=RPCS, concurrency=CONCURRENCY,
                        duration_s=args.duration, warmup_s=args.warmup, repeats=args.repeats)
    examples = ensure_examples(MODELS)
    load_average = os.getloadavg()[0]
    results: dict[str, dict[str, dict[str, float]]] = {}
    server_pid = None
    with temp_folder("bench-batcher-") as folder:
        inputs = write_input_files(examples, MODELS, Path(folder))
        for variant, parameters in VARIANTS.items():
            repository = comparison_repository(examples, Path(folder) / variant, MODELS, True,
                                               {**ORT_PARAMETERS, **parameters})
            with PeregrineProcess(repository, cpus=scenario.server_cpus,
                                  name=f"batcher-{variant}") as server:
                server_pid = server.pid
                for model in MODELS:
                    for rpc in RPCS:
                        document = drive(server, f"batcher-{variant}", model, rpc,
                                         inputs[model], scenario, f"peregrine {variant}")
                        for step in (document or {}).get("steps", []):
                            split = step.get("server_split") or {}
                            results.setdefault(variant, {})[
                                f"{model}/{rpc}/{step['concurrency']}"] = {
                                "rps": step["throughput_rps"],
                                "p50_ms": step["latency_ms"]["p50"],
                                "p99_ms": step["latency_ms"]["p99"],
                                "mean_batch": float(split.get("mean_batch_rows") or 1.0),
                            }
    return {
        "benchmark": "batcher_choices",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": command,
        "environment": environment(server_pid),
        "load_average_1m": load_average,
        "scenario": scenario.as_dict(),
        "variants": VARIANTS,
        "results": results,
    }


def markdown(report: dict[str, Any]) -> str:
    results = report["results"]
    cases = list(results.get("default", {}))
    rows = []
    for case in cases:
        base = results["default"][case]
        row = [case.replace("/", " "), f"{base['rps']:,.0f} ({base['p50_ms']:.2f}, "
               f"batch {base['mean_batch']:.1f})"]
        for variant in list(VARIANTS)[1:]:
            other = results.get(variant, {}).get(case)
            row.append("n/a" if other is None else
                       f"{other['rps']:,.0f} ({other['p50_ms']:.2f}, batch "
                       f"{other['mean_batch']:.1f}) {other['rps'] / base['rps']:.2f}x")
        rows.append(row)
    scenario = report["scenario"]
    return "\n".join([
        *section_header(SECTION, report),
        f"Closed loop, `peregrine bench run` (one process) on CPU {scenario['generator_cpus']}, "
        f"the server on CPU {scenario['server_cpus']}; {scenario['duration_s']} s per step "
        f"after {scenario['warmup_s']} s warm-up, median of {scenario['repeats']}; 1-minute "
        f"load average at start {report['load_average_1m']:.2f}. Cells: infer/s (p50 ms, mean "
        "batch rows), and for the variants the ratio to the default.", "",
        markdown_table(["model rpc in-flight", "default (adaptive, inline)",
                        *list(VARIANTS)[1:]], rows),
        "", f"Chart: [batcher_choices.png](results/{RESULTS_PNG.name})",
    ]) + "\n"


def plot(report: dict[str, Any], path: Path) -> None:
    results = report["results"]
    cases = list(results.get("default", {}))
    grouped_bars(
        path, [c.replace("/", "\n") for c in cases],
        {variant: [results.get(variant, {}).get(c, {}).get("rps", 0) for c in cases]
         for variant in VARIANTS},
        "infer/s (server on one core)",
        "Peregrine's batching choices switched off one at a time", size=(10, 4.5))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.studies.batcher_choices",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--duration", type=float, default=2.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    command = "python -m bench.studies.batcher_choices " + shlex.join(
        list(sys.argv[1:] if argv is None else argv))
    report = run(args, command.strip())
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    plot(report, RESULTS_PNG)
    if not args.no_results_md:
        replace_section(markdown(report))
    print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
