"""The PyTorch backend through a real server on loopback, on the CPU: a TorchScript model
(Triton's INPUT__0 / OUTPUT__0 names, a tuple result) and a torch.export program (named
inputs, a dict result), at varying batch sizes and concurrently (batched by the batcher), and
FP16 / BF16 tensors; every answer compared with the same network run in this process. Then
the failures a client or an operator meets: a config the program contradicts, KIND_GPU
without CUDA, an output of another type than declared. The same serving on CUDA is
tests/gpu/test_pytorch_gpu.py."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="torch is not installed (the README's test command installs its CPU "
    "build where PyTorch's page of wheels, or a local wheel, offers it)")

import tritonclient.grpc as grpcclient  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from tests import torch_models  # noqa: E402
from tests.server_harness import ServerThread  # noqa: E402


def infer(client: grpcclient.InferenceServerClient, model: str,
          inputs: dict[str, tuple[np.ndarray, str]]) -> grpcclient.InferResult:
    sent = []
    for name, (value, datatype) in inputs.items():
        tensor = grpcclient.InferInput(name, list(value.shape), datatype)
        tensor.set_data_from_numpy(value)
        sent.append(tensor)
    return client.infer(model, sent)


def runtime_of(client: grpcclient.InferenceServerClient, model: str) -> str:
    return str(client.get_model_config(model).config.parameters["runtime"].string_value)


def index(client: grpcclient.InferenceServerClient) -> dict[str, tuple[str, str]]:
    return {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}


def test_torchscript_and_exported_models_answer_as_in_process(tmp_path: Path) -> None:
    torch_models.scripted_mlp(tmp_path)
    torch_models.exported_cnn(tmp_path)
    mlp, cnn = torch_models.module("mlp"), torch_models.module("cnn")
    rng = np.random.default_rng(0)

    def mlp_case(rows: int) -> tuple[dict[str, tuple[np.ndarray, str]], list[np.ndarray]]:
        x = rng.standard_normal((rows, 8)).astype(np.float32)
        b = rng.standard_normal((rows, 3)).astype(np.float32)
        with torch.inference_mode():
            expected = [t.numpy() for t in mlp(torch.from_numpy(x), torch.from_numpy(b))]
        return {"INPUT__0": (x, "FP32"), "INPUT__1": (b, "FP32")}, expected

    def cnn_case(rows: int) -> tuple[dict[str, tuple[np.ndarray, str]], dict[str, np.ndarray]]:
        image = rng.standard_normal((rows, 3, 16, 16)).astype(np.float32)
        with torch.inference_mode():
            out = cnn(torch.from_numpy(image))
        return {"image": (image, "FP32")}, {k: v.numpy() for k, v in out.items()}

    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        assert runtime_of(client, "mlp").startswith("pytorch ")
        assert runtime_of(client, "mlp").endswith("(torchscript) on cpu")
        assert runtime_of(client, "cnn").endswith("(torch.export) on cpu")
        config = client.get_model_config("cnn").config
        assert (config.platform, config.backend) == ("pytorch_libtorch", "pytorch")
        for rows in (1, 2, 5, 16):
            inputs, expected = mlp_case(rows)
            result = infer(client, "mlp", inputs)
            np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected[0], rtol=1e-6,
                                       atol=1e-6)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), expected[1])
            inputs, named = cnn_case(rows)
            result = infer(client, "cnn", inputs)
            for name, value in named.items():
                np.testing.assert_allclose(result.as_numpy(name), value, rtol=1e-5, atol=1e-6)
        # Concurrent requests of mixed sizes, batched together by the batcher.
        cases = [mlp_case(1 + i % 3) for i in range(48)]
        with ThreadPoolExecutor(12) as pool:
            results = list(pool.map(lambda case: infer(client, "mlp", case[0]), cases))
        for (_, expected), result in zip(cases, results, strict=True):
            np.testing.assert_allclose(result.as_numpy("OUTPUT__0"), expected[0], rtol=1e-5,
                                       atol=1e-6)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT__1"), expected[1])
        statistics = client.get_inference_statistics("mlp").model_stats[0]
        assert statistics.execution_count < statistics.inference_count, "nothing was batched"


def test_fp16_and_bf16_tensors(tmp_path: Path) -> None:
    torch_models.scripted_half(tmp_path)
    # Values bf16 holds exactly (tritonclient sends float32 cut to bf16's 16 bits).
    x = (np.arange(12, dtype=np.float32).reshape(3, 4) / 4 - 1).astype(np.float16)
    y = np.arange(12, dtype=np.float32).reshape(3, 4) / 2 - 3
    with torch.inference_mode():
        x2, y1 = torch_models.module("half")(torch.from_numpy(x),
                                             torch.from_numpy(y).to(torch.bfloat16))
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        result = infer(client, "half", {"x": (x, "FP16"), "y": (y, "BF16")})
        assert result.as_numpy("x2").dtype == np.float16
        np.testing.assert_array_equal(result.as_numpy("x2"), x2.numpy())
        np.testing.assert_array_equal(result.as_numpy("y1"), y1.to(torch.float32).numpy())


def _replace(model_dir: Path, old: str, new: str) -> None:
    config = model_dir / "config.pbtxt"
    text = config.read_text()
    assert old in text
    config.write_text(text.replace(old, new))


def test_configs_the_model_contradicts_fail_to_load_saying_why(tmp_path: Path) -> None:
    _replace(torch_models.exported_cnn(tmp_path, "wrong_type"), "TYPE_FP32 dims: [ 3, 16, 16 ]",
             "TYPE_FP16 dims: [ 3, 16, 16 ]")
    _replace(torch_models.exported_cnn(tmp_path, "wrong_rank"), "dims: [ 3, 16, 16 ]",
             "dims: [ 768 ]")
    _replace(torch_models.scripted_mlp(tmp_path, "wrong_name"), "INPUT__1", "bias_vector")
    _replace(torch_models.exported_cnn(tmp_path, "no_file"), 'default_model_filename: "model.pt2"',
             "")
    torch_models.scripted_mlp(tmp_path, "needs_gpu", kind="KIND_GPU")
    with ServerThread(tmp_path, strict_readiness=False) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        states = index(client)
        expected = {
            "wrong_type": "input 'image' is TYPE_FP16 in the config but float32 in the program",
            "wrong_rank": "input 'image' has 2 dims in the config (with the batch dimension) "
                          "but 4 in the program",
            "wrong_name": "input 'bias_vector' is neither named <name>__<index> (INPUT__0) nor "
                          "an argument of the model's forward, which takes ['features', 'bias']",
            # A torch.export program is model.pt2, named by default_model_filename.
            "no_file": "has no version directory holding 'model.pt'",
            "needs_gpu": "instance_group kind KIND_GPU needs CUDA, but torch",
        }
        if torch.cuda.is_available():
            del expected["needs_gpu"]
        for model, message in expected.items():
            state, reason = states[model]
            assert state == "UNAVAILABLE", (model, state)
            assert message in reason, (model, reason)


def test_an_output_of_another_type_than_declared_is_an_internal_error(tmp_path: Path) -> None:
    # TorchScript says nothing of its result's types before it runs: the first run finds out.
    _replace(torch_models.scripted_mlp(tmp_path), '"OUTPUT__1" data_type: TYPE_FP32',
             '"OUTPUT__1" data_type: TYPE_INT32')
    x = np.zeros((1, 8), dtype=np.float32)
    b = np.zeros((1, 3), dtype=np.float32)
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as raised:
            infer(client, "mlp", {"INPUT__0": (x, "FP32"), "INPUT__1": (b, "FP32")})
        assert raised.value.status() == "StatusCode.INTERNAL"
        assert ("the PyTorch model's output 'OUTPUT__1' is float32, but the config declares "
                "TYPE_INT32") in raised.value.message()
