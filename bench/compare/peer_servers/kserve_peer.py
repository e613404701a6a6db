"""KServe's Python model server from PyPI, in its own virtualenv (bench/.venv-kserve).

``ensure_venv()`` installs kserve, onnxruntime and numpy when missing; ``KServeProcess``
starts bench/compare/peer_servers/kserve_model.py with the comparison's ONNX files (see its
docstring for
what KServe lacks: streaming, batching, statistics, tensor metadata).
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.compare.model_repo import ORT_PARAMETERS, model_file
from bench.compare.servers import ServerProcess, free_port
from bench.results_md import BENCH_DIR

VENV = BENCH_DIR / ".venv-kserve"
REQUIREMENTS = ("kserve==0.21.0", "onnxruntime", "numpy")
SCRIPT = Path(__file__).resolve().parent / "kserve_model.py"


def ensure_venv(venv: Path = VENV) -> Path:
    """The virtualenv's python, installing KServe into it first when missing."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import kserve"]
    if python.is_file() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    print(f"installing {', '.join(REQUIREMENTS)} into {venv} (once) ...", file=sys.stderr)
    subprocess.run(["python3", "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *REQUIREMENTS], check=True)
    return python


def version(venv: Path = VENV) -> str:
    out = subprocess.run([str(venv / "bin" / "python"), "-c",
                          "from importlib.metadata import version; print(version('kserve'))"],
                         capture_output=True, text=True, check=False)
    return out.stdout.strip() or "unknown"


class KServeProcess(ServerProcess):
    def __init__(self, repository: Path, models: Sequence[str], cpus: str | None = None,
                 parameters: Mapping[str, str] = ORT_PARAMETERS) -> None:
        python = ensure_venv()
        grpc_port = free_port()
        argv = [str(python), str(SCRIPT), "--grpc_port", str(grpc_port),
                "--http_port", str(free_port()),
                "--intra_op_threads", parameters["intra_op_thread_count"],
                "--allow_spinning", parameters["allow_spinning"]]
        for name in models:
            argv += ["--model", f"{name}={model_file(repository, name)}"]
        super().__init__("kserve", argv, grpc_port, cpus)
