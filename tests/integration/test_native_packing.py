"""The compiled hot path changes nothing a client can see: two servers on one repository, one
started with PEREGRINE_NATIVE=0 (the numpy reference packer) and one with the compiled packer,
answer the same concurrent requests (so batches form) with bit-identical responses. And a
model with server-side preprocessing takes raw uint8 images from any client."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnxruntime as ort
import pytest
from onnx import helper
from tritonclient.grpc import service_pb2, service_pb2_grpc

from server.packing import NativePacker, ReferencePacker
from server.preprocess.reference import preprocess_batch
from server.spec import ImagePreprocess, TensorSpec
from server.types import DataType
from tests import model_factory
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
NUMERIC = [d for d in model_factory.IDENTITY_DTYPES if d != "BYTES"]
IMAGENET = {"preprocess.scale": "0.00392156862745098", "preprocess.mean": "0.485,0.456,0.406",
            "preprocess.std": "0.229,0.224,0.225"}


def image_identity_model(repo: Path, name: str, dtype: str, dims: tuple[int, ...],
                         parameters: dict[str, str]) -> None:
    """OUTPUT0 = image: the response is the preprocessed tensor itself."""
    spec = model_factory.TensorSpec("image", dtype, dims)
    out = model_factory.TensorSpec("OUTPUT0", dtype, dims)
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], ["OUTPUT0"])], name,
        [helper.make_tensor_value_info("image", model_factory.ONNX_TYPE[dtype], ["N", *dims])],
        [helper.make_tensor_value_info("OUTPUT0", model_factory.ONNX_TYPE[dtype], ["N", *dims])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    config = model_factory.render_config(
        name, max_batch_size=16, inputs=[spec], outputs=[out], parameters=parameters,
        max_queue_delay_microseconds=3000,
    )
    model_factory.write_model(repo, name, model, config)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, examples_repo: Path) -> Path:
    repo = tmp_path_factory.mktemp("native_repo")
    model_factory.identity_models(repo, max_batch_size=8, delay_us=3000)
    model_factory.add_sub_model(repo, "add_sub", max_queue_delay_microseconds=3000)
    model_factory.ragged_model(repo, "ragged", max_queue_delay_microseconds=3000)
    image_identity_model(repo, "image_nchw", "FP32", (3, 16, 16), {
        "preprocess.input": "image", "preprocess.resize": "20", "preprocess.crop": "16,16",
        "preprocess.threads": "2", **IMAGENET})
    image_identity_model(repo, "image_nhwc_fp16", "FP16", (12, 10, 1), {
        "preprocess.input": "image", "preprocess.resize": "12,10", "preprocess.layout": "NHWC",
        "preprocess.mean": "127.5", "preprocess.std": "127.5"})
    image_identity_model(repo, "image_crop", "FP32", (1, 8, 8), {
        "preprocess.input": "image", "preprocess.crop": "8,8"})
    shutil.copytree(examples_repo / "image_classifier", repo / "image_classifier")
    return repo


@pytest.fixture(scope="module")
def servers(repo: Path) -> Iterator[tuple[ServerThread, ServerThread]]:
    """(reference, native): the variable is read when each server starts."""
    patch = pytest.MonkeyPatch()
    try:
        patch.setenv("PEREGRINE_NATIVE", "0")
        reference = ServerThread(repo).start()
        patch.setenv("PEREGRINE_NATIVE", "1")
        native = ServerThread(repo).start()
    finally:
        patch.undo()
    try:
        yield reference, native
    finally:
        reference.stop()
        native.stop()


def infer_request(model: str, inputs: dict[str, tuple[str, np.ndarray]],
                  rid: str) -> service_pb2.ModelInferRequest:
    message = service_pb2.ModelInferRequest(model_name=model, id=rid)
    for name, (datatype, value) in inputs.items():
        message.inputs.add(name=name, datatype=datatype, shape=list(value.shape))
        if datatype == "BYTES":
            raw = b"".join(len(v).to_bytes(4, "little") + v for v in value.reshape(-1))
        else:
            raw = value.tobytes()
        message.raw_input_contents.append(raw)
    return message


def answer(response: service_pb2.ModelInferResponse) -> list[tuple[Any, ...]]:
    return [(o.name, o.datatype, list(o.shape), raw)
            for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)]


async def infer_all(url: str, requests: list[service_pb2.ModelInferRequest]
                    ) -> list[service_pb2.ModelInferResponse]:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        return list(await asyncio.gather(*(stub.ModelInfer(r, timeout=60) for r in requests)))


def random_value(rng: np.random.Generator, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    if dtype == "BYTES":
        flat = np.empty(int(np.prod(shape)), dtype=object)
        # Text: onnxruntime string tensors must be valid UTF-8.
        flat[:] = [bytes(rng.integers(32, 127, rng.integers(0, 9), dtype=np.uint8))
                   for _ in range(flat.size)]
        return flat.reshape(shape)
    np_dtype = np.dtype("<u2") if dtype == "BF16" else model_factory.NUMPY_DTYPE[dtype]
    raw = rng.integers(0, 256, int(np.prod(shape)) * np_dtype.itemsize, dtype=np.uint8)
    if dtype == "BOOL":
        raw &= 1
    if dtype in ("FP16", "FP32", "FP64"):  # finite values (NaN payloads are not the point)
        return rng.uniform(-1e3, 1e3, shape).astype(np_dtype)
    return raw.view(np_dtype).reshape(shape)


def workload(seed: int = 0) -> list[service_pb2.ModelInferRequest]:
    rng = np.random.default_rng(seed)
    requests = []
    for dtype in model_factory.IDENTITY_DTYPES:
        width = int(rng.integers(1, 6))  # one width per model: requests batch together
        for i in range(12):
            value = random_value(rng, dtype, (int(rng.integers(1, 3)), width))
            requests.append(infer_request(f"identity_{dtype.lower()}",
                                          {"INPUT0": (dtype, value)}, f"{dtype}-{i}"))
    for i in range(12):  # ragged: every request its own length, padded in the batch
        x = rng.uniform(-10, 10, (int(rng.integers(1, 3)), int(rng.integers(1, 9))))
        request = infer_request("ragged", {"X": ("FP32", x.astype(np.float32))}, f"ragged-{i}")
        # TOTAL sums over the padded length: its last bit depends on the batch it ran in.
        request.outputs.add(name="DOUBLED")
        requests.append(request)
    for i in range(12):
        a = rng.uniform(-10, 10, (int(rng.integers(1, 4)), 16)).astype(np.float32)
        b = rng.uniform(-10, 10, a.shape).astype(np.float32)
        requests.append(infer_request("add_sub", {"INPUT0": ("FP32", a), "INPUT1": ("FP32", b)},
                                      f"add_sub-{i}"))
    for model, channels, sizes in (
        ("image_nchw", 3, [(1, 20, 30), (2, 24, 20), (1, 16, 60), (3, 40, 40), (1, 17, 19)]),
        ("image_nhwc_fp16", 1, [(1, 5, 7), (2, 30, 10), (1, 12, 10)]),
        ("image_crop", 1, [(1, 8, 8), (2, 9, 20), (1, 15, 8)]),
        ("image_classifier", 3, [(1, 36, 36), (2, 50, 40), (1, 64, 96), (4, 36, 100)]),
    ):
        for i, (n, h, w) in enumerate(sizes * 2):
            image = rng.integers(0, 256, (n, h, w, channels), dtype=np.uint8)
            requests.append(infer_request(model, {"image": ("UINT8", image)}, f"{model}-{i}"))
    return requests


def test_each_server_uses_the_packer_its_environment_chose(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    reference, native = servers
    assert reference.server is not None and native.server is not None
    assert isinstance(reference.server.packer, ReferencePacker)
    assert isinstance(native.server.packer, NativePacker)


def test_native_and_reference_servers_answer_bit_identically(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    reference, native = servers
    requests = workload()
    want = asyncio.run(infer_all(reference.url, requests))
    got = asyncio.run(infer_all(native.url, requests))
    for request, w, g in zip(requests, want, got, strict=True):
        assert g.id == w.id == request.id
        assert answer(g) == answer(w), request.id
    # Batches did form (the point of comparing under concurrency).
    for model in ("identity_fp32", "ragged"):
        stats = asyncio.run(_statistics(native.url, model))
        assert stats.execution_count < stats.inference_count, model


async def _statistics(url: str, model: str) -> Any:
    async with grpc.aio.insecure_channel(url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        reply = await stub.ModelStatistics(service_pb2.ModelStatisticsRequest(name=model))
        return reply.model_stats[0]


def test_preprocessed_tensor_equals_the_numpy_oracle(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    """The identity image models echo what the model received: the preprocessed batch."""
    _, native = servers
    rng = np.random.default_rng(3)
    images = [rng.integers(0, 256, (n, h, w, 3), dtype=np.uint8)
              for n, h, w in [(2, 20, 31), (1, 64, 21), (1, 20, 20)]]
    requests = [infer_request("image_nchw", {"image": ("UINT8", im)}, f"r{i}")
                for i, im in enumerate(images)]
    responses = asyncio.run(infer_all(native.url, requests))
    pre = ImagePreprocess("image", resize_shorter=20, crop=(16, 16), scale=(1 / 255,),
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    tensor = TensorSpec("image", DataType.FP32, (3, 16, 16))
    for image, response in zip(images, responses, strict=True):
        [(name, datatype, shape, raw)] = answer(response)
        assert (name, datatype, shape) == ("OUTPUT0", "FP32", [image.shape[0], 3, 16, 16])
        assert raw == preprocess_batch([image], pre, tensor).tobytes()


def test_raw_image_request_matches_onnxruntime_on_numpy_preprocessing(
    servers: tuple[ServerThread, ServerThread], repo: Path,
) -> None:
    _, native = servers
    rng = np.random.default_rng(11)
    image = rng.integers(0, 256, (1, 48, 64, 3), dtype=np.uint8)
    [response] = asyncio.run(infer_all(native.url, [
        infer_request("image_classifier", {"image": ("UINT8", image)}, "cat")]))
    [(name, datatype, shape, raw)] = answer(response)
    assert (name, datatype, shape) == ("scores", "FP32", [1, 10])
    pre = ImagePreprocess("image", resize_shorter=36, crop=(32, 32), scale=(1 / 255,),
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
    x = preprocess_batch([image], pre, TensorSpec("image", DataType.FP32, (3, 32, 32)))
    session = ort.InferenceSession(str(repo / "image_classifier" / "1" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    [want] = session.run(["scores"], {"image": x})
    got = np.frombuffer(raw, dtype=np.float32).reshape(1, 10)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


def test_metadata_and_validation_speak_of_raw_images(
    servers: tuple[ServerThread, ServerThread],
) -> None:
    _, native = servers

    async def run() -> tuple[Any, list[Any]]:
        async with grpc.aio.insecure_channel(native.url) as channel:
            stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
            meta = await stub.ModelMetadata(
                service_pb2.ModelMetadataRequest(name="image_classifier"))
            errors = []
            for model, datatype, value in (
                ("image_crop", "UINT8", np.zeros((1, 7, 20, 1), np.uint8)),
                ("image_classifier", "FP32", np.zeros((1, 3, 32, 32), np.float32)),
                ("image_classifier", "UINT8", np.zeros((1, 36, 36, 4), np.uint8)),
            ):
                try:
                    await stub.ModelInfer(infer_request(model, {"image": (datatype, value)}, "x"))
                except grpc.aio.AioRpcError as exc:
                    errors.append((exc.code(), exc.details()))
            return meta, errors

    meta, errors = asyncio.run(run())
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [
        ("image", "UINT8", [-1, -1, -1, 3])]
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.outputs] == [
        ("scores", "FP32", [-1, 10])]
    assert [code for code, _ in errors] == [grpc.StatusCode.INVALID_ARGUMENT] * 3
    assert "image of 7x20 pixels is smaller than the 8x8 centre crop" in errors[0][1]
    assert "has datatype FP32" in errors[1][1] and "expects UINT8" in errors[1][1]
    assert "[-1, -1, 3]" in errors[2][1]
