"""The ceiling, the floor and the yardstick.

Ceiling: each model called in-process through onnxruntime (same thread settings as the
servers, pinned to the server core) at several batch sizes, in samples/s: no server can
beat it. Floor: bench/compare/noop_server.py, a grpc.aio V2 servicer that does no work, under
the same load as the real servers: the most any Python grpc.aio server can answer here.
Yardstick: bench/compare/plain_server.py, a plain-Python batching server, which the compiled
path must beat.

    python -m bench.compare.ceiling [--batch-sizes 1,8,32] [scenario options]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import (
    ORT_PARAMETERS,
    comparison_repository,
    ensure_examples,
    model_file,
)
from bench.compare.scenario import (
    Scenario,
    add_scenario_arguments,
    drive_all,
    record_comparison,
    scenario_from,
    temp_folder,
    write_input_files,
)
from bench.compare.servers import NoopServer, PlainServer
from bench.loadgen.cli import exit_on_sigterm
from bench.loadgen.environment import git_revision, machine, package_versions
from bench.loadgen.sweep import parse_concurrency
from bench.results_md import RESULTS_DIR

CEILING_FILE = RESULTS_DIR / "ceiling.json"
NOOP_KEY = "noop"
PLAIN_KEY = "plain"


def _cpu_set(cpus: str) -> set[int]:
    found: set[int] = set()
    for part in cpus.split(","):
        low, _, high = part.partition("-")
        found.update(range(int(low), int(high or low) + 1))
    return found


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = int(ORT_PARAMETERS["intra_op_thread_count"])
    spinning = ORT_PARAMETERS["allow_spinning"]
    options.add_session_config_entry("session.intra_op.allow_spinning", spinning)
    options.add_session_config_entry("session.inter_op.allow_spinning", spinning)
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def measure_model(path: Path, batch: int, seconds: float, repeats: int) -> dict[str, float]:
    """Median samples/s over ``repeats`` runs of ``seconds`` of back-to-back session.run."""
    session = _session(path)
    rng = np.random.default_rng(0)
    feeds = {t.name: rng.random([batch, *[d if isinstance(d, int) else 1 for d in t.shape[1:]]],
                                dtype=np.float32) for t in session.get_inputs()}
    for _ in range(20):
        session.run(None, feeds)
    rates, latencies = [], []
    for _ in range(repeats):
        runs, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds:
            session.run(None, feeds)
            runs += 1
        rates.append(runs * batch / elapsed)
        latencies.append(elapsed / runs * 1e6)
    return {"samples_per_s": statistics.median(rates), "us_per_run": statistics.median(latencies)}


def ort_ceiling(repository: Path, models: Sequence[str], batch_sizes: Sequence[int],
                seconds: float, repeats: int, cpus: str) -> dict[str, Any]:
    previous = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _cpu_set(cpus))
    try:
        results = {
            model: {str(batch): measure_model(model_file(repository, model), batch, seconds,
                                              repeats)
                    for batch in batch_sizes}
            for model in models
        }
    finally:
        os.sched_setaffinity(0, previous)
    return {
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_revision": git_revision(short=True),
        "machine": machine(),
        "onnxruntime": package_versions(("onnxruntime",))["onnxruntime"],
        "ort_parameters": dict(ORT_PARAMETERS),
        "cpus": cpus,
        "seconds": seconds,
        "repeats": repeats,
        "models": results,
    }


def run(scenario: Scenario, batch_sizes: Sequence[int], command: str) -> None:
    repository = ensure_examples(scenario.models)
    print(f"ceiling: onnxruntime in-process, batch sizes {list(batch_sizes)}", file=sys.stderr)
    ceiling = ort_ceiling(repository, scenario.models, batch_sizes, scenario.duration_s / 2,
                          scenario.repeats, scenario.server_cpus)
    CEILING_FILE.parent.mkdir(parents=True, exist_ok=True)
    CEILING_FILE.write_text(json.dumps(ceiling, indent=1) + "\n", encoding="utf-8")
    print("floor: the no-op grpc.aio servicer", file=sys.stderr)
    with temp_folder("bench-inputs-") as folder:
        inputs = write_input_files(repository, scenario.models, Path(folder))
        with NoopServer(cpus=scenario.server_cpus) as server:
            drive_all(server, NOOP_KEY, "no-op floor", scenario, inputs)
        print("yardstick: the plain-Python batching server", file=sys.stderr)
        plain_repository = comparison_repository(repository, Path(folder) / "plain",
                                                 scenario.models, True)
        with PlainServer(plain_repository, cpus=scenario.server_cpus) as server:
            drive_all(server, PLAIN_KEY, "plain-Python batching server", scenario, inputs)
    record_comparison(
        "ceiling", command, scenario,
        notes=["ceiling: session.run back to back in one thread pinned to the server core",
               "floor: grpc.aio servicer parsing the request and answering a fixed response "
               "(streams: in order, without the request id)",
               "yardstick: a plain-Python batching server (np.frombuffer, a queue of "
               "(inputs, future), np.concatenate, one ONNX Runtime thread; no compiled "
               "code, statistics or metrics)"],
        versions=package_versions(("onnxruntime", "grpcio", "protobuf")),
        servers={NOOP_KEY: "bench/compare/noop_server.py (grpc.aio, uvloop)",
                 PLAIN_KEY: "bench/compare/plain_server.py (grpc.aio, uvloop)"},
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare.ceiling", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_scenario_arguments(parser)
    parser.add_argument("--batch-sizes", default="1,8,32")
    args = parser.parse_args(argv)
    exit_on_sigterm()
    run(scenario_from(args), parse_concurrency(args.batch_sizes),
        "python -m bench.compare.ceiling " + " ".join(argv if argv is not None else sys.argv[1:]))
    from bench.compare.results import write_results

    print(f"wrote {write_results()}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
