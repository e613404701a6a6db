"""ModelStreamInfer: many requests in flight on one stream, answered out of order, matched by id."""

from __future__ import annotations

import functools
import threading
import types
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.server_harness import ServerThread

IDENTITY = "identity_int64"


@dataclass
class Sent:
    model: str
    rows: int
    expected: dict[str, npt.NDArray[np.generic]]


@dataclass
class Collected:
    expected_total: int
    results: list[grpcclient.InferResult] = field(default_factory=list)
    errors: list[InferenceServerException] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    done: threading.Event = field(default_factory=threading.Event)


def on_response(
    collected: Collected,
    result: grpcclient.InferResult | None,
    error: InferenceServerException | None,
) -> None:
    with collected.lock:
        if error is not None:
            collected.errors.append(error)
        else:
            assert result is not None
            collected.results.append(result)
        if len(collected.results) + len(collected.errors) >= collected.expected_total:
            collected.done.set()


def make_request(
    i: int, module: types.ModuleType = grpcclient
) -> tuple[str, list[grpcclient.InferInput], Sent]:
    """Request i: add_sub or identity_int64, batch 1..8, inputs that only request i has."""
    rows = 1 + (i * 5) % 8
    if i % 2 == 0:
        a = (np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) + i * 1000).astype(
            np.float32)
        b = np.full((rows, 16), float(i) / 8, dtype=np.float32)
        inputs = [module.InferInput("INPUT0", [rows, 16], "FP32"),
                  module.InferInput("INPUT1", [rows, 16], "FP32")]
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(b)
        return "add_sub", inputs, Sent("add_sub", rows, {"OUTPUT0": a + b, "OUTPUT1": a - b})
    width = 1 + i % 3  # different widths: the batcher must cut batches where shapes change
    x = np.arange(rows * width, dtype=np.int64).reshape(rows, width) + i * 1_000_000
    inp = module.InferInput("INPUT0", [rows, width], "INT64")
    inp.set_data_from_numpy(x)
    return IDENTITY, [inp], Sent(IDENTITY, rows, {"OUTPUT0": x})


def check_result(result: grpcclient.InferResult, sent: Sent) -> None:
    response = result.get_response()
    assert response.model_name == sent.model
    assert sorted(o.name for o in response.outputs) == sorted(sent.expected)
    for name, want in sent.expected.items():
        got = result.as_numpy(name)
        assert got is not None, name
        assert got.dtype == want.dtype and got.shape == want.shape, (response.id, name)
        assert np.array_equal(got, want), (response.id, name)


def snapshot(client: grpcclient.InferenceServerClient, model: str) -> tuple[int, int, int]:
    [stats] = client.get_inference_statistics(model, "1").model_stats
    return (
        int(stats.inference_stats.success.count),
        int(stats.inference_stats.fail.count),
        int(stats.inference_count),
    )


@pytest.fixture
def client(standard_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(standard_server.url) as c:
        yield c


def test_two_hundred_requests_on_one_stream(client: grpcclient.InferenceServerClient) -> None:
    count = 200
    bad_at = 100
    before = {m: snapshot(client, m) for m in ("add_sub", IDENTITY)}
    collected = Collected(expected_total=count + 1)
    sent: dict[str, Sent] = {}
    client.start_stream(callback=functools.partial(on_response, collected))
    try:
        for i in range(count):
            if i == bad_at:
                # An INT32 tensor for a FP32 input: answered with an error, the stream goes on.
                bad = [grpcclient.InferInput("INPUT0", [1, 16], "INT32"),
                       grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
                bad[0].set_data_from_numpy(np.zeros((1, 16), dtype=np.int32))
                bad[1].set_data_from_numpy(np.zeros((1, 16), dtype=np.float32))
                client.async_stream_infer("add_sub", bad, request_id="bad-request")
            model, inputs, expected = make_request(i)
            request_id = f"req-{i}"
            sent[request_id] = expected
            client.async_stream_infer(model, inputs, request_id=request_id)
        assert collected.done.wait(timeout=60), (
            f"{len(collected.results)} results and {len(collected.errors)} errors arrived"
        )
    finally:
        client.stop_stream()

    [error] = collected.errors
    assert "INVALID_ARGUMENT" in str(error)
    assert "INPUT0" in str(error) and "INT32" in str(error)
    ids = [r.get_response().id for r in collected.results]
    assert len(ids) == count
    assert set(ids) == set(sent)
    for result in collected.results:
        check_result(result, sent[result.get_response().id])

    for model in ("add_sub", IDENTITY):
        mine = [s for s in sent.values() if s.model == model]
        success0, fail0, count0 = before[model]
        success1, fail1, count1 = snapshot(client, model)
        assert success1 - success0 == len(mine)
        assert count1 - count0 == sum(s.rows for s in mine)
        assert fail1 - fail0 == (1 if model == "add_sub" else 0)


def test_stream_errors_for_unknown_model_and_bad_shape(
    client: grpcclient.InferenceServerClient,
) -> None:
    collected = Collected(expected_total=3)
    client.start_stream(callback=functools.partial(on_response, collected))
    try:
        model, inputs, expected = make_request(0)
        client.async_stream_infer("no_such_model", inputs, request_id="unknown")
        wrong = grpcclient.InferInput("INPUT0", [1, 3], "FP32")
        wrong.set_data_from_numpy(np.zeros((1, 3), dtype=np.float32))
        client.async_stream_infer("add_sub", [wrong], request_id="wrong")
        client.async_stream_infer(model, inputs, request_id="good")
        assert collected.done.wait(timeout=30)
    finally:
        client.stop_stream()
    messages = sorted(str(e) for e in collected.errors)
    assert len(messages) == 2
    assert any("NOT_FOUND" in m and "no_such_model" in m for m in messages), messages
    assert any("INVALID_ARGUMENT" in m for m in messages), messages
    [good] = collected.results
    assert good.get_response().id == "good"
    check_result(good, expected)


def test_stream_error_responses_carry_the_request_id(standard_server: ServerThread) -> None:
    def requests() -> Iterator[service_pb2.ModelInferRequest]:
        for i in range(6):
            request = service_pb2.ModelInferRequest(model_name="identity_int32", id=f"r{i}")
            shape = [1, i + 1]
            request.inputs.add(name="INPUT0", datatype="INT32", shape=shape)
            data = np.full(shape, i, dtype=np.int32).tobytes()
            if i % 3 == 1:
                data = data[:-1]  # one byte short: an error for this request only
            request.raw_input_contents.append(data)
            yield request

    with grpc.insecure_channel(standard_server.url) as channel:
        stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
        responses = list(stub.ModelStreamInfer(requests(), timeout=30))
    by_id = {r.infer_response.id: r for r in responses}
    assert sorted(by_id) == [f"r{i}" for i in range(6)]
    for i in range(6):
        response = by_id[f"r{i}"]
        if i % 3 == 1:
            assert "INVALID_ARGUMENT" in response.error_message
            assert "bytes" in response.error_message
            assert response.infer_response.model_name == "identity_int32"
        else:
            assert response.error_message == ""
            raw = response.infer_response.raw_output_contents[0]
            assert np.array_equal(np.frombuffer(raw, dtype=np.int32),
                                  np.full(i + 1, i, dtype=np.int32))


async def test_aio_stream_infer(
    standard_server: ServerThread, client: grpcclient.InferenceServerClient
) -> None:
    count = 50
    before = {m: snapshot(client, m) for m in ("add_sub", IDENTITY)}
    sent: dict[str, Sent] = {}

    async def requests() -> AsyncIterator[dict[str, object]]:
        for i in range(count):
            model, inputs, expected = make_request(i + 7, aioclient)
            request_id = f"aio-{i}"
            sent[request_id] = expected
            yield {"model_name": model, "inputs": inputs, "request_id": request_id}

    results: list[grpcclient.InferResult] = []
    async with aioclient.InferenceServerClient(standard_server.url) as c:
        responses = c.stream_infer(requests(), stream_timeout=60)
        async for result, error in responses:
            assert error is None, error
            results.append(result)
    assert len(results) == count
    assert {r.get_response().id for r in results} == set(sent)
    for result in results:
        check_result(result, sent[result.get_response().id])
    for model in ("add_sub", IDENTITY):
        mine = [s for s in sent.values() if s.model == model]
        success0, fail0, count0 = before[model]
        success1, fail1, count1 = snapshot(client, model)
        assert success1 - success0 == len(mine)
        assert count1 - count0 == sum(s.rows for s in mine)
        assert fail1 == fail0
