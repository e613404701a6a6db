"""Seldon MLServer from PyPI, in its own virtualenv, serving the comparison's ONNX models.

``ensure_venv()`` creates bench/.venv-mlserver with ``python3 -m venv`` and installs
mlserver, onnxruntime and numpy when it is missing. ``MLServerProcess`` writes a settings
folder (server settings plus one model-settings.json per model) and starts ``mlserver start``.

Settings that matter for the comparison: ``parallel_workers: 0`` (inference in the server
process: MLServer 1.7.1 with parallel workers and uvloop 0.23 crashes, "There is no current
event loop"); adaptive batching on with the example config's max batch size and queue delay
(``max_batch_size`` / ``max_batch_time``), or off; the same ONNX Runtime thread settings as
the other servers; metrics off; bound to 127.0.0.1.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bench.compare.model_repo import ORT_PARAMETERS, batching_of, model_file
from bench.compare.servers import ServerProcess, free_port
from bench.results_md import BENCH_DIR

VENV = BENCH_DIR / ".venv-mlserver"
REQUIREMENTS = ("mlserver==1.7.1", "onnxruntime", "numpy")
RUNTIME_DIR = Path(__file__).resolve().parent


def ensure_venv(venv: Path = VENV) -> Path:
    """The virtualenv's ``mlserver`` executable, installing it first when missing."""
    executable = venv / "bin" / "mlserver"
    if executable.is_file():
        return executable
    print(f"installing {', '.join(REQUIREMENTS)} into {venv} (once) ...", file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], check=True)
    return executable


def version(venv: Path = VENV) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "import mlserver; print(mlserver.__version__)"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


def write_settings(folder: Path, repository: Path, models: Sequence[str], batching: bool,
                   grpc_port: int, http_port: int,
                   parameters: Mapping[str, str] = ORT_PARAMETERS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "settings.json").write_text(json.dumps({
        "host": "127.0.0.1", "http_port": http_port, "grpc_port": grpc_port,
        "parallel_workers": 0, "debug": False, "metrics_endpoint": None,
        "load_models_at_startup": True,
    }, indent=1))
    for name in models:
        config = (repository / name / "config.pbtxt").read_text(encoding="utf-8")
        limits = batching_of(config)
        settings: dict[str, Any] = {
            "name": name,
            "implementation": "mlserver_runtime.OnnxRuntimeModel",
            "parameters": {"uri": str(model_file(repository, name)), "version": "1",
                           "extra": dict(parameters)},
        }
        if batching and limits.max_batch_size > 0:
            settings["max_batch_size"] = limits.max_batch_size
            settings["max_batch_time"] = limits.max_queue_delay_us / 1e6
        (folder / name).mkdir(exist_ok=True)
        (folder / name / "model-settings.json").write_text(json.dumps(settings, indent=1))
    return folder


class MLServerProcess(ServerProcess):
    def __init__(self, repository: Path, models: Sequence[str], batching: bool,
                 cpus: str | None = None) -> None:
        executable = ensure_venv()
        grpc_port = free_port()
        self._folder = tempfile.TemporaryDirectory(prefix="bench-mlserver-")
        folder = write_settings(Path(self._folder.name), repository, models, batching,
                                grpc_port, free_port())
        super().__init__(
            f"mlserver-batching-{'on' if batching else 'off'}",
            [str(executable), "start", str(folder)], grpc_port, cpus,
            env={"PYTHONPATH": str(RUNTIME_DIR)}, cwd=folder,
        )

    def stop(self) -> None:
        super().stop()
        self._folder.cleanup()
