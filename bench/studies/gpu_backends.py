"""GPU backends on one model: ONNX Runtime's CUDA provider, ONNX Runtime's TensorRT provider,
the native TensorRT backend and the PyTorch backend (without and with CUDA graphs), in-process
and through a Peregrine server.

In-process (the ceiling): the backend instance the server would load, ``execute`` called back
to back from one thread at each batch size; for PyTorch, the program run by PyTorch alone
(bench/studies/torch_repository.py). Models: the examples (cnn, mlp_classifier) for ONNX
Runtime and TensorRT; cnn and resnet50 (a ResNet-50-sized network written there) for
PyTorch. Through the server: a fresh ``peregrine serve``
per runtime (KIND_GPU, GPU 0, the example's batching), closed loop at each concurrency with
requests of each batch size (bench.loadgen.runner, the same load generator as every comparison).
Writes bench/results/gpu_backends.json and gpu_backends.png; the headline is the server's
samples/s at the highest concurrency as a share of the in-process figure.

    python -m bench.studies.gpu_backends [--model cnn] [--batch-sizes 1,8,32] \\
        [--concurrency 1,16,64] [--precision fp16] [--seconds 10] [--runtimes ort_cuda,...]

Without a GPU (nvidia-smi) it prints why and exits 0 without writing anything; a runtime
whose pieces are missing (onnxruntime-gpu, tensorrt, torch with CUDA) or that has no such
model is skipped with a message and the others still run.
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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import ensure_examples, latest_version, set_parameters
from bench.loadgen.environment import git_revision, machine, package_versions
from bench.results_md import RESULTS_DIR
from bench.studies import torch_repository

RESULTS_JSON = RESULTS_DIR / "gpu_backends.json"
RESULTS_PNG = RESULTS_DIR / "gpu_backends.png"
RUNTIMES = ("ort_cuda", "ort_trt", "trt", "torch", "torch_graphs")
LABELS = {"ort_cuda": "ORT CUDA EP", "ort_trt": "ORT TensorRT EP", "trt": "TensorRT (native)",
          "torch": "PyTorch", "torch_graphs": "PyTorch, CUDA graphs"}
TORCH_RUNTIMES = ("torch", "torch_graphs")


def gpu_problem() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "nvidia-smi is not installed"
    listed = subprocess.run([smi, "-L"], capture_output=True, text=True, check=False)
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"nvidia-smi -L: {(listed.stdout or listed.stderr).strip()!r}"
    return None


def runtime_problem(runtime: str, model: str) -> str | None:
    if runtime in TORCH_RUNTIMES:
        if model not in torch_repository.SHAPES:
            return f"no PyTorch build of {model} (there are {sorted(torch_repository.SHAPES)})"
        try:
            import torch
        except ImportError as exc:
            return f"torch is not installed: {exc}"
        return None if torch.cuda.is_available() else "torch sees no CUDA device"
    if model not in ("cnn", "mlp_classifier"):
        return f"{model} is not an example ONNX model"
    import onnxruntime as ort

    providers = ort.get_available_providers()
    if "CUDAExecutionProvider" not in providers:
        return "onnxruntime has no CUDAExecutionProvider (install the 'gpu' extra)"
    if runtime == "ort_trt" and "TensorrtExecutionProvider" not in providers:
        return "onnxruntime has no TensorrtExecutionProvider"
    if runtime == "trt":
        try:
            import tensorrt  # noqa: F401
        except ImportError as exc:
            return f"tensorrt is not installed: {exc}"
    return None


def gpu_name() -> str:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "unknown"
    out = subprocess.run([smi, "--query-gpu=name", "--format=csv,noheader"],
                         capture_output=True, text=True, check=False).stdout
    return out.strip().splitlines()[0] if out.strip() else "unknown"


#: Engine and timing caches, relative to the model directory (where the server confines them).
CACHE = "engine_cache"


def config_for(example: str, runtime: str, precision: str) -> str:
    """The example's config.pbtxt on GPU 0 for ``runtime`` (edited as text)."""
    text = example.replace("KIND_CPU", "KIND_GPU")
    if runtime == "trt":
        text = text.replace('platform: "onnxruntime_onnx"', 'platform: "tensorrt_plan"')
        return set_parameters(text, {"trt_build_from_onnx": "true",
                                     "trt_precision": precision,
                                     "trt_engine_cache_dir": f"{CACHE}/trt"})
    if runtime == "ort_trt":
        return set_parameters(text, {
            "execution_accelerator": "tensorrt",
            "trt_fp16": "true" if precision == "fp16" else "false",
            "trt_engine_cache_path": f"{CACHE}/ort_trt",
            "trt_timing_cache_path": f"{CACHE}/ort_trt",
        })
    return text


def make_repository(root: Path, model: str, runtime: str, precision: str) -> Path:
    if runtime in TORCH_RUNTIMES:
        return torch_repository.make_repository(root / runtime, model,
                                                cuda_graphs=runtime == "torch_graphs")
    source = ensure_examples([model]) / model
    repo = root / runtime
    target = repo / model / "1"
    target.mkdir(parents=True)
    shutil.copyfile(latest_version(source) / "model.onnx", target / "model.onnx")
    example = (source / "config.pbtxt").read_text()
    (repo / model / "config.pbtxt").write_text(config_for(example, runtime, precision))
    return repo


def in_process(repo: Path, model: str, batch_sizes: Sequence[int], seconds: float,
               repeats: int, runtime: str) -> dict[str, Any]:
    """Samples/s of the backend instance itself (median of ``repeats``) per batch size; for
    PyTorch, of the program run by PyTorch alone."""
    from server.app import open_model_offline

    spec, load = open_model_offline(repo, model)
    if runtime in TORCH_RUNTIMES:
        execute: Callable[[dict[str, Any]], object] = torch_repository.plain_pytorch(repo,
                                                                                     model)
        description, close = "pytorch alone, in process", lambda: None
    else:
        instance = load("1")
        execute, description, close = instance.execute, instance.description, instance.close
    try:
        results: dict[str, Any] = {"runtime": description}
        rng = np.random.default_rng(0)
        for batch in batch_sizes:
            feeds = {t.name: rng.standard_normal((batch, *t.dims)).astype(t.datatype.numpy_dtype)
                     for t in spec.inputs}
            for _ in range(20):
                execute(feeds)
            rates, latencies = [], []
            for _ in range(repeats):
                runs, start = 0, time.perf_counter()
                while (elapsed := time.perf_counter() - start) < seconds:
                    execute(feeds)
                    runs += 1
                rates.append(runs * batch / elapsed)
                latencies.append(elapsed / runs * 1e6)
            results[str(batch)] = {"samples_per_s": statistics.median(rates),
                                   "us_per_batch": statistics.median(latencies)}
            print(f"  in-process batch {batch}: {results[str(batch)]['samples_per_s']:.0f} "
                  "samples/s", file=sys.stderr)
    finally:
        close()
    return results


def through_server(repo: Path, model: str, batch_sizes: Sequence[int],
                   concurrency: Sequence[int], seconds: float) -> dict[str, Any]:
    from bench.compare.servers import PeregrineProcess
    from bench.loadgen.runner import RunConfig, run

    results: dict[str, Any] = {}
    with PeregrineProcess(repo, name="peregrine-gpu") as server:
        for batch in batch_sizes:
            document = run(RunConfig(url=server.url, model=model, batch_size=batch,
                                     concurrency=tuple(concurrency), duration_s=seconds,
                                     warmup_s=min(3.0, seconds), server_pid=server.pid,
                                     label=f"{model} batch {batch}"), command=[])
            results[str(batch)] = {
                str(step["concurrency"]): {
                    "samples_per_s": step["samples_per_s"],
                    "p50_ms": step["latency_ms"]["p50"],
                    "p99_ms": step["latency_ms"]["p99"],
                    "errors": step["errors"],
                } for step in document["steps"]
            }
            top = results[str(batch)][str(max(concurrency))]
            print(f"  server batch {batch} at {max(concurrency)} in flight: "
                  f"{top['samples_per_s']:.0f} samples/s", file=sys.stderr)
    return results


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runtimes = [r for r in RUNTIMES if r in document["in_process"]]
    batches = [str(b) for b in document["batch_sizes"]]
    top = str(max(document["concurrency"]))
    fig, axis = plt.subplots(figsize=(9, 4.5))
    width = 0.8 / max(1, 2 * len(runtimes))
    for i, runtime in enumerate(runtimes):
        xs = np.arange(len(batches)) + (2 * i) * width
        ceiling = [document["in_process"][runtime][b]["samples_per_s"] for b in batches]
        served = [document["server"][runtime][b][top]["samples_per_s"] for b in batches]
        axis.bar(xs, ceiling, width, label=f"{LABELS[runtime]} in-process", alpha=0.5)
        axis.bar(xs + width, served, width, label=f"{LABELS[runtime]} server ({top} in flight)")
    axis.set_xticks(np.arange(len(batches)) + width * (len(runtimes) - 0.5), batches)
    axis.set_xlabel("batch size (rows per request)")
    axis.set_ylabel("samples/s")
    axis.set_title(f"{document['model']} on {document['gpu']} ({document['precision']})")
    axis.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.studies.gpu_backends", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cnn")
    parser.add_argument("--batch-sizes", default="1,8,32")
    parser.add_argument("--concurrency", default="1,16,64")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp16",
                        help="for the TensorRT runtimes (the CUDA provider runs FP32)")
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--runtimes", default=",".join(RUNTIMES))
    parser.add_argument("--output", type=Path, default=RESULTS_JSON)
    args = parser.parse_args(argv)
    problem = gpu_problem()
    if problem is not None:
        print(f"bench.studies.gpu_backends: skipped, no GPU here: {problem}", file=sys.stderr)
        return 0
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    concurrency = [int(c) for c in args.concurrency.split(",")]
    document: dict[str, Any] = {
        "kind": "gpu_backends",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.studies.gpu_backends " + " ".join(
            argv if argv is not None else sys.argv[1:]),
        "git_revision": git_revision(short=True),
        "machine": machine(),
        "gpu": gpu_name(),
        "versions": package_versions(("onnxruntime", "onnxruntime-gpu", "tensorrt",
                                      "cuda-python", "torch", "grpcio")),
        "model": args.model,
        "precision": args.precision,
        "batch_sizes": batch_sizes,
        "concurrency": concurrency,
        "seconds": args.seconds,
        "in_process": {}, "server": {}, "served_share": {}, "skipped": {},
    }
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as folder:
        root = Path(folder)
        for runtime in args.runtimes.split(","):
            missing = runtime_problem(runtime, args.model)
            if missing is not None:
                print(f"{runtime}: skipped: {missing}", file=sys.stderr)
                document["skipped"][runtime] = missing
                continue
            print(f"{runtime}: {LABELS[runtime]}", file=sys.stderr)
            repo = make_repository(root, args.model, runtime, args.precision)
            ceiling = in_process(repo, args.model, batch_sizes, args.seconds / 2, args.repeats,
                                 runtime)
            served = through_server(repo, args.model, batch_sizes, concurrency, args.seconds)
            document["in_process"][runtime] = ceiling
            document["server"][runtime] = served
            top = str(max(concurrency))
            document["served_share"][runtime] = {
                str(b): served[str(b)][top]["samples_per_s"]
                / ceiling[str(b)]["samples_per_s"] for b in batch_sizes
            }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if document["in_process"]:
        try:
            plot(document, args.output.with_suffix(".png"))
        except ImportError as exc:  # matplotlib (the bench extra) is not on every GPU machine
            print(f"no chart: {exc}", file=sys.stderr)
    print(f"wrote {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
