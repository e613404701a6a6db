"""Every datatype round-trips bit-exactly, raw and typed; outputs match onnxruntime run directly."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException, deserialize_bytes_tensor

from tests import model_factory
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1), (3, 5), (8, 4)]  # the last one is a full batch (max_batch_size 8)

NUMERIC = [d for d in model_factory.IDENTITY_DTYPES if d not in ("BYTES", "BF16")]
# Typed `contents` field of every datatype that has one.
TYPED_FIELD = {
    "BOOL": "bool_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
BYTES_SAMPLES = [
    b"",
    b"plain ascii",
    "h\u00e9llo w\u00f6rld \u2713 \u65e5\u672c\u8a9e \U0001f985".encode(),
    b"embedded\x00nul\x00",
    b"\x00",
    b"",
    b"x" * 1000,
    "\u00fc\u00df\u20ac".encode(),
]


@pytest.fixture
def client(standard_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(standard_server.url) as c:
        yield c


@pytest.fixture
def stub(standard_server: ServerThread) -> Iterator[service_pb2_grpc.GRPCInferenceServiceStub]:
    with grpc.insecure_channel(standard_server.url) as channel:
        yield service_pb2_grpc.GRPCInferenceServiceStub(channel)


def special_values(dtype: str) -> npt.NDArray[Any]:
    """Extremes and awkward bit patterns first, so even a [1, 1] tensor gets one."""
    np_dtype = model_factory.NUMPY_DTYPE[dtype]
    if dtype == "BOOL":
        return np.array([True, False], dtype=np.bool_)
    if np_dtype.kind in "iu":
        info = np.iinfo(np_dtype)
        return np.array([info.max, info.min, 0, 1, info.max - 1, info.min + 1], dtype=np_dtype)
    bits = {
        "FP16": [0x7E01, 0x7C00, 0xFC00, 0x8000, 0x0001, 0x7BFF, 0x7D55, 0xFE7F, 0x3C00],
        "FP32": [0x7FC00001, 0x7F800000, 0xFF800000, 0x80000000, 0x00000001, 0x7F7FFFFF,
                 0x7FA12345, 0xFFC0DEAD, 0x3F800000],
        "FP64": [0x7FF8000000000001, 0x7FF0000000000000, 0xFFF0000000000000,
                 0x8000000000000000, 0x0000000000000001, 0x7FEFFFFFFFFFFFFF,
                 0x7FF4000000000ABC, 0xFFF8DEADBEEF0000, 0x3FF0000000000000],
    }[dtype]
    uint = {2: np.uint16, 4: np.uint32, 8: np.uint64}[np_dtype.itemsize]
    return np.array(bits, dtype=uint).view(np_dtype)


def sample(dtype: str, shape: tuple[int, ...], seed: int = 0) -> npt.NDArray[Any]:
    np_dtype = model_factory.NUMPY_DTYPE[dtype]
    count = int(np.prod(shape))
    rng = np.random.default_rng(seed)
    if dtype == "BOOL":
        rest = rng.integers(0, 2, count).astype(np.bool_)
    else:
        rest = rng.integers(0, 256, count * np_dtype.itemsize, dtype=np.uint8).view(np_dtype)
    values = np.concatenate([special_values(dtype), rest])[:count]
    return values.reshape(shape)


def bits(array: npt.NDArray[Any]) -> bytes:
    return np.ascontiguousarray(array).tobytes()


def infer_identity(
    client: grpcclient.InferenceServerClient, dtype: str, data: npt.NDArray[Any]
) -> npt.NDArray[Any]:
    inp = grpcclient.InferInput("INPUT0", list(data.shape), dtype)
    inp.set_data_from_numpy(data)
    result = client.infer(f"identity_{dtype.lower()}", [inp])
    [output] = result.get_response().outputs
    assert (output.name, output.datatype, list(output.shape)) == (
        "OUTPUT0", dtype, list(data.shape)
    )
    out = result.as_numpy("OUTPUT0")
    assert out is not None
    return np.asarray(out)


# -- raw encoding through tritonclient ---------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", NUMERIC)
def test_numeric_round_trip_is_bit_exact(
    client: grpcclient.InferenceServerClient, dtype: str, shape: tuple[int, ...]
) -> None:
    data = sample(dtype, shape, seed=len(dtype) + shape[0])
    out = infer_identity(client, dtype, data)
    assert out.dtype == data.dtype
    assert out.shape == data.shape
    assert bits(out) == bits(data)


def test_extremes_survive(client: grpcclient.InferenceServerClient) -> None:
    int8 = np.array([[-128, 127, 0, -1]], dtype=np.int8)
    assert bits(infer_identity(client, "INT8", int8)) == bits(int8)
    u64 = np.array([[np.iinfo(np.uint64).max, 2**63, 0]], dtype=np.uint64)
    out = infer_identity(client, "UINT64", u64)
    assert out[0, 0] == 18446744073709551615 and out[0, 1] == 2**63
    f32 = np.array([[np.nan, np.inf, -np.inf, -0.0]], dtype=np.float32)
    out32 = infer_identity(client, "FP32", f32)
    assert np.isnan(out32[0, 0]) and out32[0, 1] == np.inf and out32[0, 2] == -np.inf
    assert np.signbit(out32[0, 3])
    fp16 = np.array([[65504.0, -65504.0, 6e-8, np.nan]], dtype=np.float16)
    assert bits(infer_identity(client, "FP16", fp16)) == bits(fp16)
    flags = np.array([[True, False, True], [False, False, True]])
    out_bool = infer_identity(client, "BOOL", flags)
    assert out_bool.dtype == np.bool_ and np.array_equal(out_bool, flags)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_bytes_round_trip(
    client: grpcclient.InferenceServerClient, shape: tuple[int, ...]
) -> None:
    count = int(np.prod(shape))
    items = [BYTES_SAMPLES[(i * 3 + 1) % len(BYTES_SAMPLES)] + str(i).encode()
             for i in range(count)]
    items[0] = BYTES_SAMPLES[2]
    data = np.array(items, dtype=np.object_).reshape(shape)
    out = infer_identity(client, "BYTES", data)
    assert out.shape == data.shape
    assert out.reshape(-1).tolist() == items


def test_bytes_empty_nul_and_unicode(client: grpcclient.InferenceServerClient) -> None:
    data = np.array(BYTES_SAMPLES, dtype=np.object_).reshape(2, 4)
    out = infer_identity(client, "BYTES", data)
    assert out.reshape(-1).tolist() == BYTES_SAMPLES
    empty = np.array([[b"", b""], [b"", b""]], dtype=np.object_)
    assert infer_identity(client, "BYTES", empty).reshape(-1).tolist() == [b""] * 4


def test_bytes_not_utf8_is_invalid_argument(client: grpcclient.InferenceServerClient) -> None:
    data = np.array([[b"fine", b"\xff\xfe not utf-8"]], dtype=np.object_)
    inp = grpcclient.InferInput("INPUT0", [1, 2], "BYTES")
    inp.set_data_from_numpy(data)
    with pytest.raises(InferenceServerException) as err:
        client.infer("identity_bytes", [inp])
    assert str(err.value.status()) == "StatusCode.INVALID_ARGUMENT"
    assert "UTF-8" in err.value.message()
    assert "element 1" in err.value.message()
    ok = np.array([[b"still served"]], dtype=np.object_)
    assert infer_identity(client, "BYTES", ok).tolist() == [[b"still served"]]


async def test_bytes_not_utf8_fails_only_its_own_request(standard_server: ServerThread) -> None:
    """A bad request batched with good ones must not take the good ones down with it."""
    async with aioclient.InferenceServerClient(standard_server.url) as c:

        async def one(i: int) -> tuple[int, bytes | None, str | None]:
            bad = i % 7 == 3
            value = b"\xc3\x28 bad" if bad else f"good {i} \u2713".encode()
            inp = aioclient.InferInput("INPUT0", [1, 1], "BYTES")
            inp.set_data_from_numpy(np.array([[value]], dtype=np.object_))
            try:
                result = await c.infer("identity_bytes", [inp], request_id=str(i))
            except InferenceServerException as exc:
                return i, None, str(exc.status())
            out = result.as_numpy("OUTPUT0")
            assert out is not None
            return i, out[0, 0], None

        results = await asyncio.gather(*(one(i) for i in range(42)))
    for i, value, status in results:
        if i % 7 == 3:
            assert status == "StatusCode.INVALID_ARGUMENT", i
        else:
            assert status is None, (i, status)
            assert value == f"good {i} \u2713".encode()


# -- BF16 ----------------------------------------------------------------------------------------

BF16_WORDS = [0x3FC0, 0xC000, 0x7F80, 0xFF80, 0x8000, 0x0000, 0x0001, 0x7F7F, 0xFF7F,
              0x7FC1, 0xFFC0, 0x3F80, 0x4049, 0xBE00, 0x0080]


def test_bf16_is_served(client: grpcclient.InferenceServerClient) -> None:
    index = {m.name: m for m in client.get_model_repository_index().models}
    assert index["identity_bf16"].state == "READY", index["identity_bf16"].reason
    assert client.is_model_ready("identity_bf16")


@pytest.mark.parametrize("shape", [(1, 1), (3, 5)], ids=lambda s: "x".join(map(str, s)))
def test_bf16_round_trip_tritonclient(
    client: grpcclient.InferenceServerClient, shape: tuple[int, ...]
) -> None:
    count = int(np.prod(shape))
    words = np.array((BF16_WORDS * 2)[:count], dtype=np.uint16).reshape(shape)
    as_fp32 = (words.astype(np.uint32) << 16).view(np.float32)
    out = infer_identity(client, "BF16", as_fp32)
    assert out.dtype == np.float32
    assert np.array_equal((out.view(np.uint32) >> 16).astype(np.uint16), words)


def test_bf16_round_trip_raw_bit_patterns(
    stub: service_pb2_grpc.GRPCInferenceServiceStub,
) -> None:
    words = np.array([*BF16_WORDS, 0x7F81, 0xFFFF, 0x7FFF], dtype="<u2")
    request = service_pb2.ModelInferRequest(model_name="identity_bf16")
    request.inputs.add(name="INPUT0", datatype="BF16", shape=[2, words.size // 2])
    request.raw_input_contents.append(words.tobytes())
    response = stub.ModelInfer(request, timeout=10)
    [output] = response.outputs
    assert (output.datatype, list(output.shape)) == ("BF16", [2, words.size // 2])
    assert response.raw_output_contents[0] == words.tobytes()


# -- typed contents, built by hand -------------------------------------------------------------


def typed_values(dtype: str, count: int) -> list[Any]:
    if dtype == "BYTES":
        return [BYTES_SAMPLES[i % len(BYTES_SAMPLES)] for i in range(count)]
    values = sample(dtype, (count,), seed=7)
    if dtype in ("FP32", "FP64"):
        values = np.where(np.isfinite(values), values, 1.5)  # NaN != NaN would hide nothing
    return [v.item() for v in values]


@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (8, 2)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", list(TYPED_FIELD))
def test_typed_contents_round_trip(
    stub: service_pb2_grpc.GRPCInferenceServiceStub, dtype: str, shape: tuple[int, ...]
) -> None:
    count = int(np.prod(shape))
    values = typed_values(dtype, count)
    request = service_pb2.ModelInferRequest(model_name=f"identity_{dtype.lower()}", id="typed")
    tensor = request.inputs.add(name="INPUT0", datatype=dtype, shape=list(shape))
    getattr(tensor.contents, TYPED_FIELD[dtype]).extend(values)
    response = stub.ModelInfer(request, timeout=10)
    assert response.id == "typed"
    [output] = response.outputs
    assert (output.name, output.datatype, list(output.shape)) == ("OUTPUT0", dtype, list(shape))
    assert not output.HasField("contents")
    [raw] = response.raw_output_contents
    if dtype == "BYTES":
        decoded = deserialize_bytes_tensor(raw)
        assert decoded.tolist() == values
    else:
        np_dtype = model_factory.NUMPY_DTYPE[dtype]
        expected = np.array(values, dtype=np_dtype)
        assert raw == expected.tobytes()


def test_typed_contents_several_inputs(stub: service_pb2_grpc.GRPCInferenceServiceStub) -> None:
    a = np.arange(32, dtype=np.float32) / 4
    b = np.linspace(-3, 3, 32).astype(np.float32)
    request = service_pb2.ModelInferRequest(model_name="add_sub")
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[2, 16]).contents.fp32_contents.extend(
        a.tolist())
    request.inputs.add(name="INPUT1", datatype="FP32", shape=[2, 16]).contents.fp32_contents.extend(
        b.tolist())
    response = stub.ModelInfer(request, timeout=10)
    outputs = {
        o.name: np.frombuffer(raw, dtype=np.float32).reshape(list(o.shape))
        for o, raw in zip(response.outputs, response.raw_output_contents, strict=True)
    }
    assert np.array_equal(outputs["OUTPUT0"], (a + b).reshape(2, 16))
    assert np.array_equal(outputs["OUTPUT1"], (a - b).reshape(2, 16))


# -- requested outputs and agreement with onnxruntime ------------------------------------------


def add_sub_inputs(
    a: npt.NDArray[np.float32], b: npt.NDArray[np.float32]
) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
              grpcclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def test_requested_output_subset(client: grpcclient.InferenceServerClient) -> None:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((3, 16)).astype(np.float32)
    b = rng.standard_normal((3, 16)).astype(np.float32)
    result = client.infer("add_sub", add_sub_inputs(a, b),
                          outputs=[grpcclient.InferRequestedOutput("OUTPUT1")])
    response = result.get_response()
    assert [o.name for o in response.outputs] == ["OUTPUT1"]
    assert len(response.raw_output_contents) == 1
    assert result.as_numpy("OUTPUT0") is None
    assert np.array_equal(result.as_numpy("OUTPUT1"), a - b)
    both = client.infer("add_sub", add_sub_inputs(a, b), outputs=[
        grpcclient.InferRequestedOutput("OUTPUT1"), grpcclient.InferRequestedOutput("OUTPUT0")])
    assert [o.name for o in both.get_response().outputs] == ["OUTPUT1", "OUTPUT0"]
    assert np.array_equal(both.as_numpy("OUTPUT0"), a + b)


def session(path: Path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_add_sub_matches_onnxruntime(
    client: grpcclient.InferenceServerClient, standard_repo: Path
) -> None:
    rng = np.random.default_rng(11)
    a = rng.standard_normal((5, 16)).astype(np.float32) * 1e3
    b = rng.standard_normal((5, 16)).astype(np.float32)
    want0, want1 = session(standard_repo / "add_sub" / "1" / "model.onnx").run(
        ["OUTPUT0", "OUTPUT1"], {"INPUT0": a, "INPUT1": b})
    result = client.infer("add_sub", add_sub_inputs(a, b))
    assert np.array_equal(result.as_numpy("OUTPUT0"), want0)
    assert np.array_equal(result.as_numpy("OUTPUT1"), want1)


@pytest.fixture(scope="module")
def examples_client(examples_repo: Path) -> Iterator[grpcclient.InferenceServerClient]:
    with ServerThread(examples_repo) as running, \
            grpcclient.InferenceServerClient(running.url) as c:
        assert c.is_server_ready()
        yield c


@pytest.mark.parametrize("version", ["1", "2"])
def test_mlp_classifier_matches_onnxruntime(
    examples_client: grpcclient.InferenceServerClient, examples_repo: Path, version: str
) -> None:
    rng = np.random.default_rng(int(version))
    x = rng.uniform(0, 16, (6, 64)).astype(np.float32)
    want_label, want_proba = session(examples_repo / "mlp_classifier" / version / "model.onnx").run(
        ["label", "probabilities"], {"input": x})
    inp = grpcclient.InferInput("input", [6, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = examples_client.infer("mlp_classifier", [inp], model_version=version)
    assert result.get_response().model_version == version
    label = result.as_numpy("label")
    proba = result.as_numpy("probabilities")
    assert label is not None and label.dtype == np.int64 and label.shape == (6, 1)
    assert np.array_equal(label, want_label)
    assert proba is not None and proba.shape == (6, 10)
    np.testing.assert_allclose(proba, want_proba, rtol=1e-5, atol=1e-6)


def test_mlp_default_version_is_the_highest(
    examples_client: grpcclient.InferenceServerClient,
) -> None:
    inp = grpcclient.InferInput("input", [1, 64], "FP32")
    inp.set_data_from_numpy(np.zeros((1, 64), dtype=np.float32))
    assert examples_client.infer("mlp_classifier", [inp]).get_response().model_version == "2"


def test_cnn_matches_onnxruntime(
    examples_client: grpcclient.InferenceServerClient, examples_repo: Path
) -> None:
    x = np.random.default_rng(5).uniform(0, 1, (3, 3, 32, 32)).astype(np.float32)
    [want] = session(examples_repo / "cnn" / "1" / "model.onnx").run(["scores"], {"image": x})
    inp = grpcclient.InferInput("image", [3, 3, 32, 32], "FP32")
    inp.set_data_from_numpy(x)
    scores = examples_client.infer("cnn", [inp]).as_numpy("scores")
    assert scores is not None and scores.shape == (3, 10)
    np.testing.assert_allclose(scores, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(scores.sum(axis=1), 1.0, atol=1e-5)


def test_text_encoder_matches_onnxruntime(
    examples_client: grpcclient.InferenceServerClient, examples_repo: Path
) -> None:
    words = ["hello", "unknown-word", "grpc", "falcon", "", "f\u00e9lcon"]
    text = np.array([[w] for w in words], dtype=np.object_)
    want_ids, want_text = session(examples_repo / "text_encoder" / "1" / "model.onnx").run(
        ["token_id", "text_out"], {"text": text})
    inp = grpcclient.InferInput("text", [len(words), 1], "BYTES")
    inp.set_data_from_numpy(np.array([[w.encode()] for w in words], dtype=np.object_))
    result = examples_client.infer("text_encoder", [inp])
    ids = result.as_numpy("token_id")
    echoed = result.as_numpy("text_out")
    assert ids is not None and np.array_equal(ids, want_ids)
    assert ids[:, 0].tolist() == [0, -1, 6, 3, -1, -1]
    assert echoed is not None
    assert [v.decode() for v in echoed[:, 0]] == [str(v) for v in want_text[:, 0]] == words


def test_digits_gbm_answers_as_its_scikit_learn_model(
    examples_client: grpcclient.InferenceServerClient, examples_repo: Path
) -> None:
    """The Python-backend example: model.py around a joblib-pickled gradient boosting."""
    import joblib

    model = joblib.load(examples_repo / "digits_gbm" / "1" / "model.joblib")
    x = np.random.default_rng(7).uniform(0, 16, (5, 64)).astype(np.float32)
    inp = grpcclient.InferInput("input", [5, 64], "FP32")
    inp.set_data_from_numpy(x)
    result = examples_client.infer("digits_gbm", [inp])
    assert np.array_equal(result.as_numpy("label")[:, 0], model.predict(x))
    np.testing.assert_allclose(result.as_numpy("probabilities"), model.predict_proba(x),
                               atol=1e-6)
    x[2, 5] = np.nan
    inp.set_data_from_numpy(x)
    with pytest.raises(InferenceServerException) as caught:
        examples_client.infer("digits_gbm", [inp])
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert caught.value.message() == "input holds NaN or infinity"


def test_text_normalizer_feeds_text_encoder(
    examples_client: grpcclient.InferenceServerClient,
) -> None:
    raw = np.array([[" P\u00e9r\u00e9grine! ".encode()], [b"gRPC\n"], [b"\xff"]],
                   dtype=np.object_)
    inp = grpcclient.InferInput("raw_text", [3, 1], "BYTES")
    inp.set_data_from_numpy(raw)
    text = examples_client.infer("text_normalizer", [inp]).as_numpy("text")
    assert text[:, 0].tolist() == [b"peregrine", b"grpc", b""]
    words = grpcclient.InferInput("text", [3, 1], "BYTES")
    words.set_data_from_numpy(text)
    ids = examples_client.infer("text_encoder", [words]).as_numpy("token_id")
    assert ids[:, 0].tolist() == [2, 6, -1]
