"""Triton's perf_analyzer (C++) as a load generator, installed from PyPI and driven per step.

PyPI's ``perf-analyzer`` package is an empty placeholder; the real binary ships inside the
``tritonclient==2.40.0`` manylinux wheel (later wheels dropped it). It links
``libcudart.so.12`` (PyPI ``nvidia-cuda-runtime-cu12``) and ``libb64.so.0d`` (Debian/Ubuntu
package ``libb64-0d``). ``install`` downloads both wheels with pip and keeps the binary and
the CUDA runtime in ``bench/.perf-analyzer/`` (git-ignored):

    python -m bench.studies.perf_analyzer install

A step runs ``perf_analyzer --concurrency-range C`` (``--streaming`` for the stream RPC: C
streams with one request in flight on each, perf_analyzer's way; ``peregrine bench run``
puts all C on one stream) and returns a step in the shape of our run documents, with the
server's CPU per request and its ModelStatistics split measured around it.
"""

from __future__ import annotations

import argparse
import csv
import ctypes.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.servers import pinned
from bench.loadgen.cpu import tree_cpu_s
from bench.loadgen.server_info import ServerInfo, split_between
from bench.results_md import BENCH_DIR

HOME = BENCH_DIR / ".perf-analyzer"
WHEEL = "tritonclient==2.40.0"
BINARY_IN_WHEEL = "tritonclient-2.40.0.data/data/bin/perf_analyzer"
CUDA_RUNTIME = "nvidia-cuda-runtime-cu12"
CUDART_IN_WHEEL = "nvidia/cuda_runtime/lib/libcudart.so.12"


def find() -> Path | None:
    """The binary: $PERF_ANALYZER, else the one ``install`` put in bench/.perf-analyzer/."""
    configured = os.environ.get("PERF_ANALYZER")
    if configured:
        return Path(configured)
    binary = HOME / "perf_analyzer"
    return binary if binary.is_file() else None


def install(home: Path = HOME) -> Path:
    """Download the two wheels with pip and extract the binary and libcudart into ``home``."""
    if ctypes.util.find_library("b64") is None and not Path(
            "/usr/lib/x86_64-linux-gnu/libb64.so.0d").exists():
        raise RuntimeError("perf_analyzer needs libb64.so.0d: install the libb64-0d package")
    home.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="perf-analyzer-") as folder:
        for requirement, extra in ((WHEEL, ["--platform", "manylinux1_x86_64"]),
                                   (CUDA_RUNTIME, ["--platform", "manylinux2014_x86_64"])):
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
                            "--only-binary=:all:", *extra, "-d", folder, requirement],
                           check=True)
        for wheel in Path(folder).glob("*.whl"):
            with zipfile.ZipFile(wheel) as archive:
                for member, target in ((BINARY_IN_WHEEL, home / "perf_analyzer"),
                                       (CUDART_IN_WHEEL, home / "libcudart.so.12")):
                    if member in archive.namelist():
                        with archive.open(member) as source, target.open("wb") as out:
                            shutil.copyfileobj(source, out)
    binary = home / "perf_analyzer"
    if not binary.is_file() or not (home / "libcudart.so.12").is_file():
        raise RuntimeError(f"the wheels did not hold {BINARY_IN_WHEEL} and {CUDART_IN_WHEEL}")
    binary.chmod(0o755)
    return binary


def input_json(npz: Path, destination: Path) -> Path:
    """perf_analyzer's --input-data file: one request of the .npz's arrays (batch dim dropped,
    as perf_analyzer adds it)."""
    with np.load(npz) as arrays:
        request = {name: {"content": arrays[name][0].reshape(-1).tolist(),
                          "shape": list(arrays[name].shape[1:])} for name in arrays.files}
    destination.write_text(json.dumps({"data": [request]}), encoding="utf-8")
    return destination


def parse_csv(path: Path) -> dict[str, float]:
    """The one row of ``perf_analyzer -f``: infer/s and latency percentiles (µs)."""
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    if not rows:
        raise RuntimeError(f"perf_analyzer wrote no measurement to {path}")
    return {key: float(value) for key, value in rows[-1].items() if value not in ("", None)}


def step(binary: Path, url: str, model: str, rpc: str, concurrency: int, data: Path,
         server_pid: int, generator_cpus: str | None, measurement_ms: int = 3000,
         trials: int = 10) -> dict[str, Any]:
    """One closed-loop step; raises when perf_analyzer fails or finds no stable window."""
    info = ServerInfo(url)
    try:
        before = info.statistics(model)
        cpu_before = tree_cpu_s(server_pid)
        wall_before = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="pa-step-") as folder:
            report = Path(folder) / "step.csv"
            argv = pinned([str(binary), "-m", model, "-u", url, "-i", "grpc",
                           *(["--streaming"] if rpc == "stream" else []),
                           "--concurrency-range", str(concurrency), "--input-data", str(data),
                           "-p", str(measurement_ms), "--max-trials", str(trials), "-s", "10",
                           "-f", str(report)], generator_cpus)
            env = {**os.environ,
                   "LD_LIBRARY_PATH": os.pathsep.join(filter(None, [
                       str(binary.parent), os.environ.get("LD_LIBRARY_PATH", "")]))}
            done = subprocess.run(argv, capture_output=True, text=True, env=env, check=False)
            if done.returncode != 0 or not report.is_file():
                raise RuntimeError(f"perf_analyzer failed ({done.returncode}): "
                                   f"{(done.stdout + done.stderr)[-1500:]}")
            row = parse_csv(report)
        cpu_after = tree_cpu_s(server_pid)
        wall = time.perf_counter() - wall_before
        after = info.statistics(model)
    finally:
        info.close()
    split = split_between(before, after) if before is not None and after is not None else None
    # perf_analyzer's warm-up and trials all run at this concurrency, so its rate over the
    # whole run is close to the reported one: server CPU per request the same way for every
    # server (the no-op one has no ModelStatistics to count with).
    served = row["Inferences/Second"] * wall
    return {
        "concurrency": concurrency,
        "throughput_rps": row["Inferences/Second"],
        "latency_ms": {"p50": row["p50 latency"] / 1e3, "p99": row["p99 latency"] / 1e3},
        "server_cpu": ({"us_per_request": (cpu_after - cpu_before) / served * 1e6}
                       if served > 0 and cpu_before is not None and cpu_after is not None
                       else None),
        "server_split": split,
        "bound": None,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.studies.perf_analyzer", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["install", "where"])
    args = parser.parse_args(argv)
    if args.command == "install":
        print(install())
    else:
        found = find()
        print(found if found is not None
              else "not installed: python -m bench.studies.perf_analyzer "
              "install")
    return 0


if __name__ == "__main__":
    sys.exit(main())
