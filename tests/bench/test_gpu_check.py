"""bench/gpu_check.sh, the one script a lent GPU machine runs, checked here without a GPU: every
step runs and records why it skipped (so a device's minutes are not spent finding a broken
script), and the PyTorch repositories the GPU benchmark serves are valid models for the
PyTorch backend (config and program agree, checked on the CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="torch is not installed (the README's test "
                            "command installs its CPU build where one is offered)")

from bench.studies import torch_repository  # noqa: E402
from server.backends.pytorch import PyTorchFactory  # noqa: E402
from server.repository.model_config import read_config, to_spec  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: run the script for real")
def test_every_step_runs_and_says_why_it_skipped_without_a_gpu(tmp_path: Path) -> None:
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    steps = [line.split("\t") for line in (tmp_path / "steps.tsv").read_text().splitlines()]
    assert [s[0] for s in steps[1:]] == ["preflight", "checks", "pytest", "bench_cnn",
                                         "bench_resnet50"]
    assert all(status == "0" for _, status, _ in steps[1:]), steps
    checks = json.loads((tmp_path / "checks.json").read_text())
    assert set(checks) == {"cuda_layer", "tensorrt_instance", "tensorrt_instance_graphs"}
    assert all(c["skipped"] for c in checks.values()), checks
    pytest_log = (tmp_path / "pytest.log").read_text()
    assert "sees no CUDA device" in pytest_log  # the PyTorch GPU tests skip, saying why
    assert "skipped, no GPU here" in (tmp_path / "bench_cnn.log").read_text()


@pytest.mark.parametrize("model", ["cnn", "resnet50"])
def test_the_benchmark_repositories_are_valid_pytorch_models(
    tmp_path: Path, model: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    if model == "resnet50":  # the same layout at an eighth of the width: quick on a CPU
        full = torch_repository.export_resnet50
        monkeypatch.setattr(torch_repository, "export_resnet50",
                            lambda path: full(path, width=8))
    repo = torch_repository.make_repository(tmp_path, model, cuda_graphs=True)
    spec = to_spec(read_config(repo / model), repo / model)
    assert spec.backend == "pytorch" and spec.parameters["cuda_graphs"] == "true"
    assert spec.instances[0].kind == "GPU"
    PyTorchFactory().complete_spec(spec, str(repo / model / "1"))
