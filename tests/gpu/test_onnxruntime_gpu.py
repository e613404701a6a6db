"""ONNX Runtime on a real GPU through a real server: a KIND_GPU model runs on the CUDA
provider (IO binding) with provider options from the config, and on the TensorRT provider
with ``execution_accelerator: tensorrt``; outputs match onnxruntime on the CPU.

Skipped (whole module) without a GPU or onnxruntime-gpu.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.gpu.gpu_env import require_gpu

pytestmark = pytest.mark.gpu
require_gpu()

import numpy as np  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from server.accelerator_options import FP32_ATOL, TF32_ATOL  # noqa: E402
from tests.gpu.gpu_env import (  # noqa: E402
    cpu_reference,
    gpu_config,
    images,
    ort_tensorrt_problem,
    write_cnn,
)
from tests.server_harness import ServerThread  # noqa: E402


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    data = grpcclient.InferInput("image", list(x.shape), "FP32")
    data.set_data_from_numpy(x)
    out = client.infer(model, [data]).as_numpy("scores")
    assert out is not None
    return out


def runtime_of(client: grpcclient.InferenceServerClient, model: str) -> str:
    return str(client.get_model_config(model).config.parameters["runtime"].string_value)


def test_kind_gpu_model_runs_on_the_cuda_provider(tmp_path: Path) -> None:
    write_cnn(tmp_path, "cnn", gpu_config("cnn", platform="onnxruntime_onnx", parameters={
        "gpu_mem_limit": str(2 << 30), "cudnn_conv_algo_search": "HEURISTIC",
    }))
    reference = cpu_reference()
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        runtime = runtime_of(client, "cnn")
        assert runtime.startswith("onnxruntime CUDAExecutionProvider"), runtime
        assert runtime.endswith("on cuda:0"), runtime
        for rows in (1, 3, 8, 32):
            x = images(rows, rows)
            np.testing.assert_allclose(infer(client, "cnn", x), reference(x), atol=FP32_ATOL)
        inputs = [images(1 + i % 3, 50 + i) for i in range(64)]
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda x: infer(client, "cnn", x), inputs))
        for x, out in zip(inputs, outputs, strict=True):
            np.testing.assert_allclose(out, reference(x), atol=FP32_ATOL)


@pytest.mark.skipif(ort_tensorrt_problem() is not None, reason=str(ort_tensorrt_problem()))
@pytest.mark.parametrize(("fp16", "atol"), [("true", 1e-2), ("false", TF32_ATOL)],
                         ids=["fp16", "fp32-with-tf32"])
def test_execution_accelerator_tensorrt_runs_on_the_tensorrt_provider(
    tmp_path: Path, fp16: str, atol: float
) -> None:
    """fp32 on this provider may compute in TF32 (no per-session switch): TF32_ATOL."""
    cache = tmp_path / "repo" / "cnn" / "ort_trt_cache"  # relative to the model directory
    write_cnn(tmp_path / "repo", "cnn", gpu_config("cnn", platform="onnxruntime_onnx",
                                                   parameters={
        "execution_accelerator": "tensorrt", "trt_fp16": fp16,
        "trt_engine_cache_path": cache.name, "trt_timing_cache_path": cache.name,
    }))
    reference = cpu_reference()
    # The provider builds its engines while the model loads: minutes.
    with ServerThread(tmp_path / "repo", start_timeout_s=900) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        runtime = runtime_of(client, "cnn")
        assert runtime.startswith("onnxruntime TensorrtExecutionProvider"), runtime
        for rows in (1, 7, 32):
            x = images(rows, rows)
            np.testing.assert_allclose(infer(client, "cnn", x), reference(x), atol=atol)
    assert any(cache.iterdir()), "the TensorRT provider cached no engine"
