"""What every comparison script shares: the scenario, the inputs, and running the load.

Each server gets the same load: the same request bytes (one .npz per model, made from the
ONNX file's input signature), the same concurrency sweep, step length, warm-up and repeats,
driven by ``python -m bench run`` in a subprocess pinned to the generator's core while the
server is pinned to its own. Every run document lands in bench/results/runs/ under a fixed
name, so a directory holds only the latest run of each (server, model, rpc).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import ORT_PARAMETERS, model_file
from bench.compare.servers import ServerProcess, pinned
from bench.loadgen.environment import REPO_ROOT
from bench.results_md import RESULTS_DIR

RUNS_DIR = RESULTS_DIR / "runs"
COMPARISONS_FILE = RESULTS_DIR / "comparisons.json"
MODELS = ("mlp_classifier", "cnn")
RPCS = ("unary", "stream")

_ORT_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32}


@dataclass(frozen=True)
class Scenario:
    models: tuple[str, ...] = MODELS
    rpcs: tuple[str, ...] = RPCS
    concurrency: tuple[int, ...] = (1, 8, 32)
    duration_s: float = 2.0
    warmup_s: float = 1.0
    repeats: int = 3
    processes: int = 1
    server_cpus: str = "0"
    generator_cpus: str = "1"

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ort_parameters": dict(ORT_PARAMETERS)}


def add_scenario_arguments(parser: argparse.ArgumentParser) -> None:
    default = Scenario()
    parser.add_argument("--models", default=",".join(default.models))
    parser.add_argument("--rpcs", default=",".join(default.rpcs))
    parser.add_argument("--concurrency", default=",".join(map(str, default.concurrency)))
    parser.add_argument("--duration", type=float, default=default.duration_s,
                        help="measured seconds per step (default %(default)s)")
    parser.add_argument("--warmup", type=float, default=default.warmup_s)
    parser.add_argument("--repeats", type=int, default=default.repeats,
                        help="repeats per step; the median is reported (default %(default)s)")
    parser.add_argument("--processes", type=int, default=default.processes,
                        help="generator processes (default %(default)s)")
    parser.add_argument("--server-cpus", default=default.server_cpus,
                        help="taskset CPU list for servers (default %(default)s)")
    parser.add_argument("--generator-cpus", default=default.generator_cpus,
                        help="taskset CPU list for the load generator (default %(default)s)")


def scenario_from(args: argparse.Namespace) -> Scenario:
    from bench.loadgen.sweep import parse_concurrency

    return Scenario(
        models=tuple(m for m in args.models.split(",") if m),
        rpcs=tuple(r for r in args.rpcs.split(",") if r),
        concurrency=tuple(parse_concurrency(args.concurrency)),
        duration_s=args.duration, warmup_s=args.warmup, repeats=args.repeats,
        processes=args.processes, server_cpus=args.server_cpus,
        generator_cpus=args.generator_cpus,
    )


def write_input_files(repository: Path, models: Sequence[str], folder: Path) -> dict[str, Path]:
    """One .npz per model: one row of random values in [0, 1) per input of the ONNX file."""
    import onnxruntime as ort

    files = {}
    rng = np.random.default_rng(20261125)
    for name in models:
        session = ort.InferenceSession(str(model_file(repository, name)),
                                       providers=["CPUExecutionProvider"])
        arrays = {}
        for tensor in session.get_inputs():
            shape = [d if isinstance(d, int) and d > 0 else 1 for d in tensor.shape]
            dtype = _ORT_NUMPY.get(tensor.type)
            if dtype is None:
                raise ValueError(f"{name}: input {tensor.name} of type {tensor.type}")
            arrays[tensor.name] = rng.random(shape).astype(dtype)
        path = folder / f"{name}.npz"
        np.savez(path, **arrays)  # type: ignore[arg-type]
        files[name] = path
    return files


def run_path(server_key: str, model: str, rpc: str) -> Path:
    return RUNS_DIR / f"{server_key}__{model}__{rpc}.json"


def drive(server: ServerProcess, server_key: str, model: str, rpc: str, input_file: Path,
          scenario: Scenario, label: str) -> dict[str, Any] | None:
    """Run the scenario's sweep against ``server``; the run document, or None on failure."""
    path = run_path(server_key, model, rpc)
    path.parent.mkdir(parents=True, exist_ok=True)
    argv = pinned([
        sys.executable, "-m", "bench", "run", "--url", server.url, "--model", model,
        "--rpc", rpc, "--input-file", str(input_file),
        "--concurrency", ",".join(map(str, scenario.concurrency)),
        "--duration", str(scenario.duration_s), "--warmup", str(scenario.warmup_s),
        "--repeats", str(scenario.repeats), "--processes", str(scenario.processes),
        "--server-pid", str(server.pid), "--label", label, "--json", str(path),
        "--no-plot", "--progress", "never",
    ], scenario.generator_cpus)
    print(f"  {label}: {model} {rpc} ...", file=sys.stderr, flush=True)
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        print(f"  {label}: {model} {rpc} failed:\n{done.stderr[-2000:]}", file=sys.stderr)
        return None
    document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    last = document["steps"][-1]
    print(f"    {last['throughput_rps']:,.0f} infer/s at c={last['concurrency']}, "
          f"p50 {last['latency_ms']['p50']:.3f} ms, server CPU "
          f"{(last['server_cpu'] or {}).get('percent', float('nan')):.0f}%, "
          f"errors {sum(last['errors'].values())}", file=sys.stderr, flush=True)
    return document


def drive_all(server: ServerProcess, server_key: str, label: str, scenario: Scenario,
              inputs: dict[str, Path], rpcs: Sequence[str] | None = None) -> None:
    for model in scenario.models:
        for rpc in rpcs if rpcs is not None else scenario.rpcs:
            drive(server, server_key, model, rpc, inputs[model], scenario, label)


def record_comparison(name: str, command: str, scenario: Scenario, notes: Sequence[str],
                      versions: dict[str, str], servers: dict[str, str]) -> None:
    """Note when and how a comparison last ran (bench/results/comparisons.json)."""
    from bench.loadgen.environment import git_revision, machine

    COMPARISONS_FILE.parent.mkdir(parents=True, exist_ok=True)
    try:
        known = json.loads(COMPARISONS_FILE.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        known = {}
    known[name] = {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(short=True),
        "command": command,
        "scenario": scenario.as_dict(),
        "machine": machine(),
        "versions": versions,
        "servers": servers,
        "notes": list(notes),
    }
    COMPARISONS_FILE.write_text(json.dumps(known, indent=1, sort_keys=True) + "\n",
                                encoding="utf-8")


def temp_folder(prefix: str) -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix=prefix)
