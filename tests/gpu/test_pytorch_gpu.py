"""The PyTorch backend on CUDA through a real server: a torch.export program and a TorchScript
model on KIND_GPU, with and without CUDA graphs, at varying batch sizes and concurrently;
every answer compared with the same network run on this process's CPU within FP32_ATOL (the
backend turns TF32 off: the precision contract). The same models on the CPU are
tests/integration/test_pytorch_backend.py.

Skipped (whole module) where torch sees no CUDA device.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.gpu.gpu_env import torch_cuda_problem

pytestmark = pytest.mark.gpu
if (_problem := torch_cuda_problem()) is not None:
    pytest.skip(_problem, allow_module_level=True)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402

from server.accelerator_options import FP32_ATOL  # noqa: E402
from tests import torch_models  # noqa: E402
from tests.server_harness import ServerThread  # noqa: E402

GPU = 'gpus: [ 0 ]'


def cnn_case(rows: int, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    image = np.random.default_rng(seed).standard_normal((rows, 3, 16, 16)).astype(np.float32)
    with torch.inference_mode():
        out = torch_models.module("cnn")(torch.from_numpy(image))
    return image, {k: v.numpy() for k, v in out.items()}


def infer_cnn(client: grpcclient.InferenceServerClient, model: str,
              image: np.ndarray) -> dict[str, np.ndarray]:
    data = grpcclient.InferInput("image", list(image.shape), "FP32")
    data.set_data_from_numpy(image)
    result = client.infer(model, [data])
    return {name: result.as_numpy(name) for name in ("scores", "features")}  # type: ignore[misc]


def runtime_of(client: grpcclient.InferenceServerClient, model: str) -> str:
    return str(client.get_model_config(model).config.parameters["runtime"].string_value)


def test_exported_program_on_cuda_with_and_without_graphs(tmp_path: Path) -> None:
    torch_models.exported_cnn(tmp_path, "plain", kind="KIND_GPU", gpus=GPU)
    torch_models.exported_cnn(tmp_path, "graphs", kind="KIND_GPU", gpus=GPU,
                              parameters={"cuda_graphs": "true"})
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert runtime_of(client, "plain").endswith("(torch.export) on cuda:0 "
                                                    + torch.cuda.get_device_name(0))
        assert "cuda graphs" in runtime_of(client, "graphs")
        # Warmed-up sizes (1, 32) replay graphs from the start; 3 and 7 are captured on their
        # second run (GRAPH_WARMUP_RUNS) and replayed after.
        for step, rows in enumerate([1, 3, 3, 3, 3, 32, 7, 1, 32, 7, 7]):
            image, expected = cnn_case(rows, step)
            for model in ("plain", "graphs"):
                got = infer_cnn(client, model, image)
                for name, value in expected.items():
                    np.testing.assert_allclose(got[name], value, rtol=0, atol=FP32_ATOL,
                                               err_msg=f"{model} step {step} batch {rows}")
        with ThreadPoolExecutor(16) as pool:
            cases = [cnn_case(1 + i % 4, 100 + i) for i in range(64)]
            outputs = list(pool.map(lambda case: infer_cnn(client, "graphs", case[0]), cases))
        for (_, expected), got in zip(cases, outputs, strict=True):
            for name, value in expected.items():
                np.testing.assert_allclose(got[name], value, rtol=0, atol=FP32_ATOL)


def test_torchscript_model_on_cuda(tmp_path: Path) -> None:
    torch_models.scripted_mlp(tmp_path, kind="KIND_GPU", gpus=GPU)
    mlp = torch_models.module("mlp")
    rng = np.random.default_rng(1)
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert runtime_of(client, "mlp").startswith("pytorch ")
        assert "(torchscript) on cuda:0" in runtime_of(client, "mlp")
        for rows in (1, 4, 16):
            x = rng.standard_normal((rows, 8)).astype(np.float32)
            b = rng.standard_normal((rows, 3)).astype(np.float32)
            inputs = []
            for name, value in (("INPUT__0", x), ("INPUT__1", b)):
                tensor = grpcclient.InferInput(name, list(value.shape), "FP32")
                tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            result = client.infer("mlp", inputs)
            with torch.inference_mode():
                probs, doubled = mlp(torch.from_numpy(x), torch.from_numpy(b))
            np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), probs.numpy(), rtol=0,
                                       atol=FP32_ATOL)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), doubled.numpy())
