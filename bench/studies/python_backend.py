"""The Python backend: the scikit-learn example against calling its model in-process, and
what the process boundary costs per request.

``peregrine serve`` pinned to CPU 0 (its model processes inherit the pinning: server and model
share the core) serves three models with the inputs and outputs of ``mlp_classifier``
(FP32 [N, 64] in; ``label`` and ``probabilities`` out), each with the examples' batching:

- ``mlp_classifier``: the ONNX example (one ONNX Runtime thread), the in-server baseline;
- ``digits_echo``: a Python model that computes nothing (it answers zeros of the right
  shapes): the process boundary and the Python model API alone;
- ``digits_gbm``: the scikit-learn gradient-boosting example behind its model.py.

``peregrine bench run`` pinned to CPU 1 drives each at 1 and 16 requests in flight (unary,
one row per request). The in-process figures call the same scikit-learn model's
``predict_proba`` in a loop on CPU 0, one row per call and 16 rows per call (what a batch of
16 requests costs the model). Reported: infer/s, p50/p99 and the server's CPU per request
(over its process tree: the model processes count).

    python -m bench.studies.python_backend [--seconds 4] [--warmup 1] [--repeats 3]

Writes bench/results/python_backend.json and the "Python backend" section of
bench/RESULTS.md.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import ORT_PARAMETERS, ensure_examples, set_parameters
from bench.compare.servers import PeregrineProcess
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies.bench_run import drive
from bench.studies.study_run import start_study, study_arguments, write_document

SECTION = "## Python backend: the scikit-learn example and the process boundary"
RESULTS_JSON = RESULTS_DIR / "python_backend.json"
MODELS = ("mlp_classifier", "digits_echo", "digits_gbm")
CONCURRENCIES = (1, 16)

ECHO_MODEL_PY = '''\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            rows = len(pb_utils.get_input_tensor_by_name(request, "input").as_numpy())
            responses.append(pb_utils.InferenceResponse([
                pb_utils.Tensor("label", np.zeros((rows, 1), np.int64)),
                pb_utils.Tensor("probabilities", np.zeros((rows, 10), np.float32))]))
        return responses
'''


def repository(folder: Path) -> Path:
    examples = ensure_examples(["mlp_classifier", "digits_gbm"])
    root = folder / "models"
    root.mkdir(parents=True)
    for model in ("mlp_classifier", "digits_gbm"):
        shutil.copytree(examples / model, root / model)
    shutil.rmtree(root / "mlp_classifier" / "1")  # the latest version only
    config = root / "mlp_classifier" / "config.pbtxt"
    config.write_text(set_parameters(config.read_text(encoding="utf-8"), ORT_PARAMETERS),
                      encoding="utf-8")
    echo = root / "digits_echo"
    shutil.copytree(root / "digits_gbm", echo)
    (echo / "1" / "model.joblib").unlink()
    (echo / "1" / "model.py").write_text(ECHO_MODEL_PY, encoding="utf-8")
    (echo / "config.pbtxt").write_text(
        (echo / "config.pbtxt").read_text(encoding="utf-8").replace('"digits_gbm"',
                                                                    '"digits_echo"'),
        encoding="utf-8")
    return root


def in_process(seconds: float, cpus: str | None) -> list[dict[str, Any]]:
    """The scikit-learn model's predict_proba called in a loop here, on the server's CPU."""
    import joblib

    model = joblib.load(ensure_examples(["digits_gbm"]) / "digits_gbm" / "1" / "model.joblib")
    mine = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})
    rows_out = []
    try:
        for rows in (1, 16):
            x = np.random.default_rng(0).uniform(0, 16, (rows, 64)).astype(np.float32)
            model.predict_proba(x)
            times = []
            end = time.perf_counter() + seconds
            while time.perf_counter() < end:
                start = time.perf_counter_ns()
                model.predict_proba(x)
                times.append(time.perf_counter_ns() - start)
            per_call = np.array(times) / 1e6
            rows_out.append({"rows_per_call": rows, "calls": len(times),
                             "rows_per_s": round(rows * len(times) / (per_call.sum() / 1e3), 1),
                             "p50_ms": round(float(np.median(per_call)), 3),
                             "p99_ms": round(float(np.percentile(per_call, 99)), 3)})
    finally:
        os.sched_setaffinity(0, mine)
    return rows_out


def measure(seconds: float, warmup: float, repeats: int, server_cpus: str | None,
            client_cpus: str) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="python-backend-bench-"))
    try:
        repo = repository(folder)
        runs: list[dict[str, Any]] = []
        for repeat in range(repeats):
            with PeregrineProcess(repo, cpus=server_cpus) as server:
                for model in MODELS:
                    for concurrency in CONCURRENCIES:
                        figures = drive(server, model, "unary", concurrency, seconds, warmup,
                                        folder / f"{model}-{concurrency}.json",
                                        client_cpus=client_cpus)
                        run = {"model": model, "concurrency": concurrency,
                               "repeat": repeat + 1, **figures}
                        runs.append(run)
                        print(f"{model:>14} c={concurrency:<3} #{repeat + 1}: "
                              f"{run['throughput_rps']:,.0f} infer/s, p50 {run['p50_ms']} ms, "
                              f"server CPU {run['server_cpu_us_per_request']} us/req, errors "
                              f"{run['errors']}", file=sys.stderr, flush=True)
        return runs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for model in MODELS:
        for concurrency in CONCURRENCIES:
            mine = [r for r in runs if (r["model"], r["concurrency"]) == (model, concurrency)]

            def median(key: str, mine: list[dict[str, Any]] = mine) -> float:
                return float(np.median([r[key] for r in mine if r[key] is not None]))

            rows.append({
                "model": model, "concurrency": concurrency, "runs": len(mine),
                "throughput_rps": round(median("throughput_rps"), 1),
                "throughput_runs": [r["throughput_rps"] for r in mine],
                "p50_ms": round(median("p50_ms"), 3), "p99_ms": round(median("p99_ms"), 3),
                "server_cpu_us_per_request": round(median("server_cpu_us_per_request"), 1),
                "errors": sum(r["errors"] for r in mine)})
    return rows


def boundary(rows: list[dict[str, Any]]) -> dict[str, float]:
    """digits_echo minus mlp_classifier at one request in flight: what a request costs more
    through a model process than through an in-server ONNX model that computes little."""
    def row(model: str) -> dict[str, Any]:
        return next(r for r in rows if (r["model"], r["concurrency"]) == (model, 1))

    echo, onnx = row("digits_echo"), row("mlp_classifier")
    return {"p50_ms": round(echo["p50_ms"] - onnx["p50_ms"], 3),
            "server_cpu_us": round(echo["server_cpu_us_per_request"]
                                   - onnx["server_cpu_us_per_request"], 1)}


def write_section(document: dict[str, Any]) -> None:
    lines = section_header(SECTION, document)
    cost = document["boundary"]
    lines += [
        f"Server on CPU {document['server_cpus']} with its model processes, `peregrine bench "
        f"run` on CPU {document['client_cpus']}, unary, one row per request; "
        f"{document['seconds']} s per step after {document['warmup']} s warm-up, medians of "
        f"{document['repeats']} runs. `digits_echo` is a model.py that computes nothing: the "
        "process boundary and the model API alone. Server CPU per request is the server's "
        "process tree (model processes included) over the step, divided by the requests "
        f"answered. 1-minute load average at start and end: {document['loadavg'][0]} and "
        f"{document['loadavg'][1]} (the machine is shared; every run is in the JSON).", "",
        "| model | in flight | infer/s | p50 ms | p99 ms | server CPU us/req | errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['model']} | {row['concurrency']} | {row['throughput_rps']:,.0f} | "
            f"{row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['server_cpu_us_per_request']:.1f} | {row['errors']} |")
    lines += ["", "The scikit-learn model in-process (`predict_proba` in a loop on the "
              "server's CPU):", "",
              "| rows per call | rows/s | p50 ms per call | p99 ms per call |",
              "|---:|---:|---:|---:|"]
    for row in document["in_process"]:
        lines.append(f"| {row['rows_per_call']} | {row['rows_per_s']:,.0f} | "
                     f"{row['p50_ms']:.3f} | {row['p99_ms']:.3f} |")
    lines += [
        "", f"The process boundary, `digits_echo` against `mlp_classifier` at one request in "
        f"flight: {cost['p50_ms']:+.3f} ms of p50 and {cost['server_cpu_us']:+.1f} us of "
        "server CPU per request (writing the inputs to the shared memory, two socket "
        "messages, the model process's Python: the request objects, its JSON, numpy views, "
        "and copying the outputs back; the MLP's own compute, a few microseconds, is in the "
        "difference too). Batched requests share the messages: at 16 in flight one `execute` "
        "call carries the batch.", "",
    ]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__)
    args = parser.parse_args(argv)
    study = start_study("bench.studies.python_backend", argv, args.server_cpus,
                        args.client_cpus)
    client_cpus = ",".join(map(str, study.client_cpus))
    runs = measure(args.seconds, args.warmup, args.repeats, study.server_cpus, client_cpus)
    rows = summarise(runs)
    document = study.document(
        "python_backend", args,
        rows=rows, runs=runs, boundary=boundary(rows),
        in_process=in_process(args.seconds, study.server_cpus))
    write_document(RESULTS_JSON, document)
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
