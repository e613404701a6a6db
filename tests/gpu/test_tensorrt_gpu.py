"""The native TensorRT backend on a real GPU, through a real server: engines built from the CNN
example's ONNX (FP32, FP16, BF16), compared with onnxruntime on the CPU at varying batch
sizes; the engine cache across restarts; CUDA graphs on and off; BF16 tensors; a prebuilt
model.plan with an auto-completed config; ``peregrine trt build``.

Skipped (whole module) without a GPU, onnxruntime-gpu, tensorrt or cuda-python.
"""

from __future__ import annotations

import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from tests.gpu.gpu_env import require_tensorrt

#: Engine builds take minutes: the server's start and each test may wait that long.
BUILD_S = 900
pytestmark = [pytest.mark.gpu, pytest.mark.timeout(2 * BUILD_S)]
require_tensorrt()

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import tritonclient.grpc as grpcclient  # noqa: E402
from onnx import TensorProto, helper  # noqa: E402
from tritonclient.grpc import service_pb2, service_pb2_grpc  # noqa: E402

from server.accelerator_options import FP32_ATOL  # noqa: E402
from tests.gpu.gpu_env import ROOT, cpu_reference, gpu_config, images, write_cnn  # noqa: E402
from tests.server_harness import ServerThread  # noqa: E402

BATCHES = [1, 2, 7, 8, 16, 31, 32]
#: FP16 / BF16 engines against the FP32 CPU reference (softmax probabilities in 0..1).
FP16_ATOL = 1e-2
BF16_ATOL = 5e-2


#: The engine cache, relative to the model directory (a config's paths stay inside it).
ENGINES = "engines"


def trt_params(**extra: str) -> dict[str, str]:
    return {"trt_build_from_onnx": "true", "trt_engine_cache_dir": ENGINES, **extra}


def infer(client: grpcclient.InferenceServerClient, model: str, x: np.ndarray) -> np.ndarray:
    data = grpcclient.InferInput("image", list(x.shape), "FP32")
    data.set_data_from_numpy(x)
    result = client.infer(model, [data], outputs=[grpcclient.InferRequestedOutput("scores")])
    out = result.as_numpy("scores")
    assert out is not None
    return out


def runtime_of(client: grpcclient.InferenceServerClient, model: str) -> str:
    return str(client.get_model_config(model).config.parameters["runtime"].string_value)


def ready(client: grpcclient.InferenceServerClient, model: str) -> None:
    states = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
    assert states[model][0] == "READY", states[model]


# fp32 engines are built without TF32 (the precision contract), so FP32_ATOL holds for them.
@pytest.mark.parametrize(("precision", "atol"), [("fp32", FP32_ATOL), ("fp16", FP16_ATOL),
                                                 ("bf16", BF16_ATOL)])
def test_engine_matches_onnxruntime_at_varying_batch_sizes(
    tmp_path: Path, precision: str, atol: float
) -> None:
    repo = tmp_path / "repo"
    name = f"cnn_{precision}"
    write_cnn(repo, name, gpu_config(name, platform="tensorrt_plan", parameters=trt_params(
        trt_precision=precision)))
    reference = cpu_reference()
    with ServerThread(repo, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        ready(client, name)
        runtime = runtime_of(client, name)
        assert runtime.startswith("tensorrt ") and "on cuda:0" in runtime, runtime
        assert f"({precision}" in runtime, runtime
        for rows in BATCHES:
            x = images(rows, rows)
            np.testing.assert_allclose(infer(client, name, x), reference(x), atol=atol,
                                       err_msg=f"batch {rows}")
        # Many clients at once: the dynamic batcher forms batches of every size.
        inputs = [images(1 + i % 3, 100 + i) for i in range(96)]
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda x: infer(client, name, x), inputs))
        for x, out in zip(inputs, outputs, strict=True):
            np.testing.assert_allclose(out, reference(x), atol=atol)


def test_the_engine_cache_survives_a_restart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    cache = repo / "cnn" / ENGINES
    write_cnn(repo, "cnn", gpu_config("cnn", platform="tensorrt_plan",
                                      parameters=trt_params(trt_precision="fp16")))
    x = images(5, 0)
    with ServerThread(repo, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        first = infer(client, "cnn", x)
    plans = sorted((cache / "cnn").glob("*.plan"))
    assert len(plans) == 1
    built = {p: p.stat().st_mtime_ns for p in (cache / "cnn").iterdir()}
    meta = json.loads(plans[0].with_suffix(".json").read_text())
    assert meta["build"]["precision_flags"] == ["fp16"] and meta["build_seconds"] > 0
    assert list((cache / "timing").glob("*.cache")), "the timing cache was not saved"
    with ServerThread(repo, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        np.testing.assert_array_equal(infer(client, "cnn", x), first)
    # No rebuild: the same files, untouched, and nothing new.
    assert {p: p.stat().st_mtime_ns for p in (cache / "cnn").iterdir()} == built


def test_cuda_graphs_give_the_same_results(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    for name, on in (("plain", "false"), ("graphs", "true")):
        write_cnn(repo, name, gpu_config(name, platform="tensorrt_plan", parameters=trt_params(
            trt_cuda_graphs=on)))
    reference = cpu_reference()
    with ServerThread(repo, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        assert "cuda graphs" in runtime_of(client, "graphs")
        assert "cuda graphs" not in runtime_of(client, "plain")
        # Repeated sizes: the second of each replays the graph captured by the first. The two
        # models' engines are separate builds (their tactics may differ): each is held to the
        # precision contract against the CPU, never one to the other bit for bit.
        captured: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for step, rows in enumerate([1, 8, 3, 1, 8, 3, 32, 32, 5, 1]):
            x = captured[rows][0] if rows in captured else images(rows, step)
            plain, graphs = infer(client, "plain", x), infer(client, "graphs", x)
            for out in (plain, graphs):
                np.testing.assert_allclose(out, reference(x), rtol=0, atol=FP32_ATOL,
                                           err_msg=f"step {step}, batch {rows}")
            if rows in captured:  # a replay of one engine's graph: the same numbers
                np.testing.assert_array_equal(graphs, captured[rows][1])
            captured.setdefault(rows, (x, graphs))
    # CUDA graphs are a runtime choice: both engines have the same cache key.
    plans = [sorted(p.name for p in (repo / m / ENGINES / m).glob("*.plan"))
             for m in ("plain", "graphs")]
    assert plans[0] == plans[1] and len(plans[0]) == 1


def bf16_words(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 words, rounding to nearest even (as TensorRT's cast)."""
    bits = x.astype(np.float32).view(np.uint32)
    rounded = bits + 0x7FFF + ((bits >> 16) & 1)
    return (rounded >> 16).astype(np.uint16)


def bf16_values(words: np.ndarray) -> np.ndarray:
    return (words.astype(np.uint32) << 16).view(np.float32)


def bf16_model(path: Path) -> None:
    """y = 2 * x + 1 on BF16 tensors [N, 8] (computed in FP32 between two casts)."""
    nodes = [
        helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "two"], ["x2"]),
        helper.make_node("Add", ["x2", "one"], ["yf"]),
        helper.make_node("Cast", ["yf"], ["y"], to=TensorProto.BFLOAT16),
    ]
    graph = helper.make_graph(
        nodes, "bf16", [helper.make_tensor_value_info("x", TensorProto.BFLOAT16, ["N", 8])],
        [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, ["N", 8])],
        initializer=[helper.make_tensor("two", TensorProto.FLOAT, [], [2.0]),
                     helper.make_tensor("one", TensorProto.FLOAT, [], [1.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))


def test_bf16_tensors_travel_as_raw_words(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    bf16_model(repo / "bf16" / "1" / "model.onnx")
    (repo / "bf16" / "config.pbtxt").write_text("\n".join([
        'name: "bf16"', 'platform: "tensorrt_plan"', "max_batch_size: 16",
        'input [ { name: "x" data_type: TYPE_BF16 dims: [ 8 ] } ]',
        'output [ { name: "y" data_type: TYPE_BF16 dims: [ 8 ] } ]',
        "dynamic_batching { }", "instance_group [ { kind: KIND_GPU } ]",
        'parameters { key: "trt_build_from_onnx" value { string_value: "true" } }',
        f'parameters {{ key: "trt_engine_cache_dir" value {{ string_value: "{ENGINES}" }} }}',
    ]) + "\n")
    import grpc

    with ServerThread(repo, BUILD_S) as server, grpc.insecure_channel(server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        for rows in (1, 5, 16):
            values = np.random.default_rng(rows).uniform(-4, 4, (rows, 8)).astype(np.float32)
            words = bf16_words(values)
            request = service_pb2.ModelInferRequest(model_name="bf16")
            request.inputs.add(name="x", datatype="BF16", shape=[rows, 8])
            request.raw_input_contents.append(words.tobytes())
            response = stub.ModelInfer(request, timeout=60)
            assert response.outputs[0].datatype == "BF16"
            got = np.frombuffer(response.raw_output_contents[0], dtype="<u2").reshape(rows, 8)
            expected = 2 * bf16_values(words) + 1
            np.testing.assert_allclose(bf16_values(got), expected, rtol=2 ** -7)


def trt_cli(*args: str, env_cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    import os

    env = {k: v for k, v in os.environ.items() if not k.startswith("PEREGRINE_")}
    if env_cache is not None:
        env["PEREGRINE_TRT_CACHE_DIR"] = str(env_cache)
    return subprocess.run([sys.executable, "-m", "server.cli", "trt", "build", *args],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600,
                          check=False)


def test_trt_build_then_serve_the_plan_with_an_autocompleted_config(tmp_path: Path) -> None:
    source, served, cache = tmp_path / "src", tmp_path / "served", tmp_path / "cache"
    write_cnn(source, "cnn", gpu_config("cnn", platform="onnxruntime_onnx", parameters={}))
    plan = served / "cnn_plan" / "1" / "model.plan"
    first = trt_cli("--model-repository", str(source), "--model", "cnn", "--precision", "fp16",
                    "--output", str(plan), env_cache=cache)
    assert first.returncode == 0, first.stderr
    result: dict[str, Any] = json.loads(first.stdout)
    assert result["source"] == "built" and result["gpu"] and Path(result["engine"]).is_file()
    assert "Building" in first.stderr or "steps" in first.stderr, first.stderr  # progress
    again = trt_cli("--model-repository", str(source), "--model", "cnn", "--precision", "fp16",
                    env_cache=cache)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["source"] == "cache"
    # Serve the plan: no inputs/outputs in the config, they come from the engine.
    (served / "cnn_plan" / "config.pbtxt").write_text(gpu_config(
        "cnn_plan", platform="tensorrt_plan", parameters={}, inputs=False))
    reference = cpu_reference()
    with ServerThread(served, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        ready(client, "cnn_plan")
        config = client.get_model_config("cnn_plan").config
        assert [(t.name, list(t.dims)) for t in config.input] == [("image", [3, 32, 32])]
        assert "(plan" in runtime_of(client, "cnn_plan")
        for rows in (1, 9, 32):
            x = images(rows, rows)
            np.testing.assert_allclose(infer(client, "cnn_plan", x), reference(x),
                                       atol=FP16_ATOL)


def test_two_instances_each_with_their_own_engine(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    write_cnn(repo, "cnn", gpu_config("cnn", platform="tensorrt_plan", count=2,
                                      parameters=trt_params(trt_cuda_graphs="true")))
    reference = cpu_reference()
    with ServerThread(repo, BUILD_S) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        inputs = [images(1 + i % 4, i) for i in range(64)]
        with ThreadPoolExecutor(16) as pool:
            outputs = list(pool.map(lambda x: infer(client, "cnn", x), inputs))
        for x, out in zip(inputs, outputs, strict=True):
            np.testing.assert_allclose(out, reference(x), atol=FP32_ATOL)
