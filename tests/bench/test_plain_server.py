"""bench/compare/plain_server.py, the plain-Python batching yardstick, answers like a server:
unary and streamed inference equal to ONNX Runtime in-process on the latest version (40
requests in flight on one stream, batched together), and the metadata perf_analyzer needs."""

from __future__ import annotations

import queue
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as grpcclient

from bench.compare.servers import PlainServer

MODEL = "mlp_classifier"


@pytest.fixture(scope="module")
def plain(examples_repo: Path) -> Iterator[PlainServer]:
    with PlainServer(examples_repo) as server:
        yield server


def expected(examples_repo: Path, x: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(str(examples_repo / MODEL / "2" / "model.onnx"),
                                   providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, {"input": x}), strict=True))


def request(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("input", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def test_unary_and_stream_answer_as_the_model_does(
    plain: PlainServer, examples_repo: Path
) -> None:
    rng = np.random.default_rng(3)
    rows = [rng.random((1, 64), dtype=np.float32) * 16 for _ in range(40)]
    with grpcclient.InferenceServerClient(plain.url) as client:
        result = client.infer(MODEL, request(rows[0]))
        want = expected(examples_repo, rows[0])
        assert np.array_equal(result.as_numpy("label"), want["label"])
        assert np.allclose(result.as_numpy("probabilities"), want["probabilities"])
        answers: queue.Queue[tuple[object, object]] = queue.Queue()
        client.start_stream(callback=lambda result, error: answers.put((result, error)))
        for i, x in enumerate(rows):
            client.async_stream_infer(MODEL, request(x), request_id=str(i))
        got = {}
        for _ in rows:
            result, error = answers.get(timeout=30)
            assert error is None
            got[result.get_response().id] = result.as_numpy("label")  # type: ignore[attr-defined]
        client.stop_stream()
    batch = np.concatenate(rows)
    labels = expected(examples_repo, batch)["label"]
    assert all(np.array_equal(got[str(i)], labels[i:i + 1]) for i in range(len(rows)))


def test_it_describes_its_models_for_perf_analyzer(plain: PlainServer) -> None:
    with grpcclient.InferenceServerClient(plain.url) as client:
        assert client.is_server_ready() and client.is_model_ready(MODEL)
        assert client.get_server_metadata(as_json=True)["name"] == "plain"
        metadata = client.get_model_metadata(MODEL, as_json=True)
        assert metadata["inputs"][0]["shape"] == ["-1", "64"]
        assert client.get_model_config(MODEL, as_json=True)["config"]["max_batch_size"] > 0
