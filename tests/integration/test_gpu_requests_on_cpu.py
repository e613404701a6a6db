"""Asking for a GPU where there is none, through a real server on this CPU-only machine: a
KIND_GPU model is UNAVAILABLE with a clear reason unless the config allows the CPU fallback, a
TensorRT model says TensorRT is missing, and ModelConfig names the runtime that serves."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from server.backends import onnxruntime as ort_backend
from server.errors import ModelLoadError
from server.repository.model_config import read_config, to_spec
from server.spec import InstanceSpec
from tests import model_factory
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

pytestmark = pytest.mark.skipif(HAS_CUDA, reason="these tests are about a machine without CUDA")


def gpu_model(repo: Path, name: str, parameters: dict[str, str] | None = None,
              platform: str = "onnxruntime_onnx") -> Path:
    model_dir = model_factory.add_sub_model(repo, name)
    config = (model_dir / "config.pbtxt").read_text().replace("KIND_CPU", "KIND_GPU")
    config = config.replace('platform: "onnxruntime_onnx"', f'platform: "{platform}"')
    for key, value in (parameters or {}).items():
        config += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    model_factory.write_config(model_dir, config)
    return model_dir


def index(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models
            if m.version}


def test_gpu_models_without_a_gpu(tmp_path: Path) -> None:
    gpu_model(tmp_path, "needs_gpu")
    gpu_model(tmp_path, "may_fall_back", {"allow_cpu_fallback": "true"})
    gpu_model(tmp_path, "trt_from_onnx", {"trt_build_from_onnx": "true"},
              platform="tensorrt_plan")
    model_factory.add_sub_model(tmp_path, "on_cpu")
    with ServerThread(tmp_path, strict_readiness=False) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        states = index(client)
        state, reason = states["needs_gpu"]
        assert state == "UNAVAILABLE"
        assert "KIND_GPU needs onnxruntime's CUDAExecutionProvider" in reason, reason
        assert "allow_cpu_fallback" in reason
        assert not client.is_model_ready("needs_gpu")

        state, reason = states["trt_from_onnx"]
        assert state == "UNAVAILABLE"
        assert "tensorrt is not installed" in reason, reason

        assert states["may_fall_back"][0] == "READY"
        assert states["on_cpu"][0] == "READY"
        config = client.get_model_config("on_cpu").config
        assert config.parameters["runtime"].string_value == "onnxruntime CPUExecutionProvider"
        fallback = client.get_model_config("may_fall_back").config
        assert fallback.parameters["runtime"].string_value == "onnxruntime CPUExecutionProvider"
        trt_config = client.get_model_config("trt_from_onnx").config
        assert trt_config.backend == "tensorrt" and trt_config.platform == "tensorrt_plan"
        assert "runtime" not in trt_config.parameters  # nothing serves it


def test_a_provider_onnxruntime_drops_is_a_load_error_not_a_cpu_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """onnxruntime falls back to the CPU with only a warning when it cannot start the CUDA
    provider; the backend refuses instead. Here CUDA is claimed available but cannot start."""
    model_dir = gpu_model(tmp_path, "claims_cuda")
    spec = to_spec(read_config(model_dir), model_dir)
    monkeypatch.setattr(ort, "get_available_providers",
                        lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    with pytest.raises(ModelLoadError, match="could not start CUDAExecutionProvider"):
        ort_backend.OnnxRuntimeFactory().load(spec, str(model_dir / "1"), 0)
    # KIND_AUTO, or a config that allows the fallback, accept the CPU (with a warning).
    auto = dataclasses.replace(spec, instances=(InstanceSpec("AUTO", 1),))
    allowed = dataclasses.replace(spec, parameters={"allow_cpu_fallback": "true"})
    for accepting in (auto, allowed):
        instance = ort_backend.OnnxRuntimeFactory().load(accepting, str(model_dir / "1"), 0)
        assert instance.description == "onnxruntime CPUExecutionProvider"
        instance.close()


def test_trt_build_on_a_cpu_machine_fails_clearly(tmp_path: Path) -> None:
    gpu_model(tmp_path, "trt_from_onnx", {"trt_build_from_onnx": "true"},
              platform="tensorrt_plan")
    model_factory.add_sub_model(tmp_path, "plan_only")
    plan = tmp_path / "plan_only" / "config.pbtxt"
    plan.write_text(plan.read_text().replace('"onnxruntime_onnx"', '"tensorrt_plan"')
                    .replace("KIND_CPU", "KIND_GPU"))

    def trt(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "server.cli", "trt", "build", "--model-repository",
             str(tmp_path), *args], cwd=ROOT, capture_output=True, text=True, timeout=120,
            check=False)

    built = trt("--model", "trt_from_onnx", "--precision", "fp16")
    assert built.returncode == 1
    assert "tensorrt is not installed" in built.stderr
    assert "differs from the config's trt_precision 'fp32'" in built.stderr
    prebuilt = trt("--model", "plan_only")
    assert prebuilt.returncode == 1 and "serves a prebuilt model.plan" in prebuilt.stderr
    missing = trt("--model", "nope")
    assert missing.returncode == 1 and "is not a model directory" in missing.stderr
    bad = trt("--model", "trt_from_onnx", "--precision", "fp12")
    assert bad.returncode == 1 and "--precision must be one of" in bad.stderr
