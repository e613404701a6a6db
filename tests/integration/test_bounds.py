"""Bounds by default, through a real server: requests in flight (server-wide and per stream),
open streams, queued bytes, a model's queue, the request caps checked before decoding, and
ragged batches that never pad past a bound. Every bound is refused with RESOURCE_EXHAUSTED
naming it, counted by bound, and every count returns to 0 whatever happened to a request.

The bounds are small here so that a handful of requests reach them; a "held" model blocks
its batches in the instance's worker thread until the test opens its gate, so what is in
flight is known exactly (no timing).
"""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.request
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server._pb import grpc_service_pb2 as pb
from server.codec import decode
from tests import model_factory
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(60)

BOUNDS = {
    "max_inflight_requests": 6,
    "max_inflight_per_stream": 3,
    "max_streams": 2,
    "max_queued_bytes": 300_000,
    "max_tensor_elements": 50_000,
    "max_request_bytes": 200_000,
    "max_bytes_elements": 1000,
}
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
INFER = "/inference.GRPCInferenceService/ModelInfer"
NO_INLINE = 'parameters { key: "inline_execution_max_us" value { string_value: "0" } }\n'


def no_inline(model_dir: Path) -> None:
    """Every batch in the worker thread (where a gate may hold it), none on the loop."""
    config = model_dir / "config.pbtxt"
    config.write_text(config.read_text(encoding="utf-8") + NO_INLINE, encoding="utf-8")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("bounds_repo")
    for dtype in ("FP32", "FP64", "UINT8", "BYTES"):
        model_factory.identity_model(repo, f"identity_{dtype.lower()}", dtype)
    no_inline(model_factory.identity_model(repo, "held", "FP32"))
    no_inline(model_factory.identity_model(repo, "held_queue", "FP32", max_batch_size=1,
                                           max_queue_size=2))
    no_inline(model_factory.ragged_model(repo, "ragged", rank=2))
    with ServerThread(repo, **BOUNDS) as running:
        yield running


class Gate:
    """Holds every batch of a model in its instance's worker thread until opened."""

    def __init__(self) -> None:
        self._open = threading.Event()

    def hold(self, server: ServerThread, model: str, monkeypatch: pytest.MonkeyPatch) -> None:
        assert server.server is not None
        for instance in server.server.repository.catalog.get(model, "1").scheduler.instances:
            run = instance.execute

            def held(inputs: Any, run: Callable[[Any], Any] = run) -> Any:
                assert self._open.wait(30), "the test never opened the gate"
                return run(inputs)

            monkeypatch.setattr(instance, "execute", held)

    def open(self) -> None:
        self._open.set()


@pytest.fixture
def gate(server: ServerThread, monkeypatch: pytest.MonkeyPatch) -> Iterator[Gate]:
    """The models 'held', 'held_queue' and 'ragged' held until the test opens the gate."""
    gate = Gate()
    for model in ("held", "held_queue", "ragged"):
        gate.hold(server, model, monkeypatch)
    yield gate
    gate.open()


def counts(server: ServerThread) -> tuple[int, int, int]:
    """(requests in flight, open streams, queued bytes), read on the server's loop."""
    assert server.server is not None
    admission = server.server.admission

    async def read() -> tuple[int, int, int]:
        return admission.inflight, admission.streams, admission.queued_bytes

    result: tuple[int, int, int] = server.call(read())
    return result


async def until(condition: Callable[[], bool], what: str, timeout: float = 20) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.005)


def queued(server: ServerThread, model: str) -> int:
    """Requests the model's scheduler holds (queued or executing)."""
    assert server.server is not None
    scheduler = server.server.repository.catalog.get(model, "1").scheduler

    async def read() -> int:
        return scheduler.inflight()

    result: int = server.call(read())
    return result


def answered(server: ServerThread, model: str) -> int:
    """Requests the model has answered successfully."""
    assert server.server is not None
    stats = server.server.repository.catalog.get(model, "1").metrics.stats

    async def read() -> int:
        return stats.success.count

    result: int = server.call(read())
    return result


def refusals(server: ServerThread) -> dict[str, float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {sample.labels["bound"]: sample.value
            for family in text_string_to_metric_families(text)
            if family.name == "peregrine_refused" for sample in family.samples
            if sample.name == "peregrine_refused_total"}


def fp32(shape: tuple[int, ...], name: str = "INPUT0", value: float = 1.0,
         dtype: str = "FP32") -> list[grpcclient.InferInput]:
    x = np.full(shape, value, dtype=np.float32 if dtype == "FP32" else np.float64)
    tensor = grpcclient.InferInput(name, list(shape), dtype)
    tensor.set_data_from_numpy(x)
    return [tensor]


def request_bytes(model: str, x: np.ndarray, request_id: str = "", name: str = "INPUT0",
                  datatype: str = "FP32") -> bytes:
    message = pb.ModelInferRequest(model_name=model, id=request_id)
    message.inputs.add(name=name, datatype=datatype, shape=list(x.shape))
    message.raw_input_contents.append(x.tobytes())
    return message.SerializeToString()


async def refused(call: Any) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as caught:
        await call
    assert caught.value.status() == "StatusCode.RESOURCE_EXHAUSTED", caught.value
    return caught.value


@pytest.fixture
async def channel(server: ServerThread) -> AsyncIterator[grpc.aio.Channel]:
    async with grpc.aio.insecure_channel(server.url) as opened:
        yield opened


def identity(arg: bytes) -> bytes:
    return arg


def open_stream(channel: grpc.aio.Channel) -> Any:
    return channel.stream_stream(STREAM, request_serializer=identity,
                                 response_deserializer=pb.ModelStreamInferResponse.FromString)()


# -- server-wide bounds --------------------------------------------------------------------------


async def test_requests_in_flight_past_the_bound_are_refused_naming_it(
    server: ServerThread, aio: aioclient.InferenceServerClient, gate: Gate
) -> None:
    before = refusals(server).get("max_inflight_requests", 0)
    held = [asyncio.ensure_future(aio.infer("held", fp32((1, 4), value=i))) for i in range(6)]
    await until(lambda: counts(server)[0] == 6, "6 requests in flight")
    error = await refused(aio.infer("identity_fp32", fp32((1, 4))))
    assert "server has 6 requests in flight (--max-inflight-requests)" in error.message()
    # Refused before its model is looked up: an unknown model gets the same answer.
    error = await refused(aio.infer("no_such_model", fp32((1, 4))))
    assert "--max-inflight-requests" in error.message()
    assert refusals(server)["max_inflight_requests"] == before + 2
    gate.open()
    for i, result in enumerate(await asyncio.gather(*held)):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), np.full((1, 4), i))
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")


async def test_queued_bytes_past_the_bound_are_refused_naming_it(
    server: ServerThread, aio: aioclient.InferenceServerClient, gate: Gate
) -> None:
    first = asyncio.ensure_future(aio.infer("held", fp32((1, 40_000))))  # 160 000 bytes
    await until(lambda: counts(server) == (1, 0, 160_000), "the first request's bytes queued")
    error = await refused(aio.infer("identity_fp32", fp32((1, 40_000))))
    assert ("server holds 160000 bytes of queued request data and the request brings 160000 "
            "more; the bound is 300000 (--max-queued-bytes)") in error.message()
    # A smaller one still fits.
    small = asyncio.ensure_future(aio.infer("held", fp32((1, 1000))))
    await until(lambda: counts(server) == (2, 0, 164_000), "the small request admitted")
    gate.open()
    await asyncio.gather(first, small)
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")
    assert refusals(server)["max_queued_bytes"] >= 1


async def test_a_full_model_queue_is_refused_naming_max_queue_size(
    server: ServerThread, aio: aioclient.InferenceServerClient, gate: Gate
) -> None:
    held = [asyncio.ensure_future(aio.infer("held_queue", fp32((1, 4)))) for _ in range(3)]
    await until(lambda: queued(server, "held_queue") == 3, "1 executing and 2 queued")
    error = await refused(aio.infer("held_queue", fp32((1, 4))))
    assert ("queue of model 'held_queue' is full (2 requests at priority 1, max_queue_size)"
            in error.message())
    assert refusals(server)["max_queue_size"] >= 1
    gate.open()
    await asyncio.gather(*held)
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")


async def test_streams_past_the_bound_are_refused_naming_it(
    server: ServerThread, channel: grpc.aio.Channel
) -> None:
    streams = [open_stream(channel) for _ in range(2)]
    await until(lambda: counts(server)[1] == 2, "2 streams open")
    third = open_stream(channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await third.read()
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == "server has 2 streams open (--max-streams)"
    for stream in streams:
        await stream.done_writing()
        assert await stream.read() is grpc.aio.EOF
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")
    assert refusals(server)["max_streams"] >= 1


# -- one stream ------------------------------------------------------------------------------------


async def test_a_stream_is_not_read_past_its_bound(
    server: ServerThread, channel: grpc.aio.Channel, gate: Gate
) -> None:
    """Nothing is answered (the model is held): the server reads 3 requests and stops, while
    the client's writes go on into the HTTP/2 windows. Once answers flow, everything is read
    and answered."""
    stream = open_stream(channel)
    total = 60
    written = 0

    async def write() -> None:
        nonlocal written
        for i in range(total):
            await stream.write(request_bytes("held", np.full((1, 4), i, np.float32), str(i)))
            written += 1
        await stream.done_writing()

    # 60 small requests fit the HTTP/2 windows: the client writes them all...
    await write()
    # ... and the server reads 3 of them, the bound, and no more while none is answered.
    await until(lambda: counts(server)[0] == 3, "3 requests read")
    assert queued(server, "held") == 3
    gate.open()
    answers = {}
    for _ in range(total):
        response = await stream.read()
        assert not response.error_message
        answers[response.infer_response.id] = response.infer_response
    assert sorted(answers, key=int) == [str(i) for i in range(total)]
    for i, answer in answers.items():
        np.testing.assert_array_equal(
            np.frombuffer(answer.raw_output_contents[0], np.float32), np.full(4, int(i)))
    assert await stream.read() is grpc.aio.EOF
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")


async def test_a_client_that_never_reads_is_held_back(
    server: ServerThread, channel: grpc.aio.Channel
) -> None:
    """The client writes and never reads: answers fill the HTTP/2 windows, then the server
    stops sending and, with 3 answers waiting, stops reading; the client's writes block.
    What the server holds for the stream never exceeds the bound."""
    stream = open_stream(channel)
    # 64 KiB: three fit --max-queued-bytes, none is refused.
    message = request_bytes("identity_fp32", np.ones((1, 16_384), np.float32))
    total = 4_000  # 256 MiB: far more than every window and socket buffer on the way
    written = 0
    seen: list[int] = []

    async def write() -> None:
        nonlocal written
        for _ in range(total):
            await stream.write(message)
            written += 1

    writer = asyncio.ensure_future(write())
    await until(lambda: counts(server)[0] == 3, "3 answers waiting on the stream")
    # Writes stop progressing once the windows are full (a write awaits flow control); what
    # the server holds for the stream meanwhile stays within the bound.
    last = -1
    while written != last:
        last = written
        for _ in range(50):
            seen.append(counts(server)[0])
            await asyncio.sleep(0.01)
    assert max(seen) <= 3
    assert not writer.done()
    assert answered(server, "identity_fp32") < written < total
    writer.cancel()
    stream.cancel()
    await asyncio.gather(writer, return_exceptions=True)
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")


# -- every path releases -----------------------------------------------------------------------


async def test_counts_return_to_zero_after_errors_cancellations_and_closed_streams(
    server: ServerThread, aio: aioclient.InferenceServerClient, channel: grpc.aio.Channel,
    gate: Gate,
) -> None:
    # Errors before and after acceptance: unknown model, bad input, a cap.
    for model, inputs in (("no_such_model", fp32((1, 4))),
                          ("identity_fp32", fp32((1, 4), name="WRONG")),
                          ("identity_fp32", fp32((1, 60_000)))):
        with pytest.raises(InferenceServerException):
            await aio.infer(model, inputs)
    assert counts(server) == (0, 0, 0)
    # A unary call cancelled by its client deadline while its model holds it.
    with pytest.raises(InferenceServerException) as caught:
        await aio.infer("held", fp32((1, 4)), client_timeout=0.5)
    assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
    # A stream with requests in flight and an error answer, closed by its client.
    stream = open_stream(channel)
    for i in range(2):
        await stream.write(request_bytes("held", np.full((1, 4), i, np.float32), str(i)))
    await stream.write(request_bytes("no_such_model", np.ones((1, 4), np.float32), "bad"))
    answer = await stream.read()
    assert answer.infer_response.id == "bad" and "[NOT_FOUND]" in answer.error_message
    await until(lambda: queued(server, "held") >= 2, "both stream requests at the model")
    stream.cancel()
    # A stream whose client stops writing with answers pending: answered, then closed.
    stream = open_stream(channel)
    await stream.write(request_bytes("held", np.ones((1, 4), np.float32), "last"))
    await stream.done_writing()
    gate.open()
    assert (await stream.read()).infer_response.id == "last"
    assert await stream.read() is grpc.aio.EOF
    await until(lambda: counts(server) == (0, 0, 0), "every count back to 0")


# -- caps before allocation ------------------------------------------------------------------


@pytest.fixture
def decoded_inputs(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the inputs the server builds an array for (none when refused before)."""
    built: list[str] = []
    original = decode._from_raw

    def counted(name: str, *args: Any, **kwargs: Any) -> Any:
        built.append(name)
        return original(name, *args, **kwargs)

    monkeypatch.setattr(decode, "_from_raw", counted)
    return built


def bytes_input(count: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, count], "BYTES")
    tensor.set_data_from_numpy(np.full((1, count), b"ab", dtype=object))
    return [tensor]


@pytest.mark.parametrize("model", ["identity_bytes", "no_such_model"])
async def test_a_bytes_flood_is_refused_before_any_object_is_built(
    server: ServerThread, aio: aioclient.InferenceServerClient, decoded_inputs: list[str],
    model: str,
) -> None:
    """Refused from the message's shape before decoding, so before the model is looked up:
    an unknown model gets the cap's answer too, not NOT_FOUND."""
    error = await refused(aio.infer(model, bytes_input(1001)))
    assert error.message() == ("the request has 1001 BYTES elements; the server takes at most "
                               "1000 per request (--max-bytes-elements)")
    assert decoded_inputs == []
    result = await aio.infer("identity_bytes", bytes_input(1000))
    assert result.as_numpy("OUTPUT0").shape == (1, 1000)


@pytest.mark.parametrize(("model", "inputs", "message"), [
    ("identity_uint8", "uint8", "input 'INPUT0' has 60000 elements (shape [1, 60000]); the "
     "server takes at most 50000 per tensor (--max-tensor-elements)"),
    ("identity_fp64", "fp64", "the request's inputs decode into 240000 bytes; the server "
     "takes at most 200000 per request (--max-request-bytes)"),
])
async def test_tensor_and_request_caps_are_refused_before_decoding(
    server: ServerThread, aio: aioclient.InferenceServerClient, decoded_inputs: list[str],
    model: str, inputs: str, message: str,
) -> None:
    if inputs == "uint8":
        tensor = grpcclient.InferInput("INPUT0", [1, 60_000], "UINT8")
        tensor.set_data_from_numpy(np.ones((1, 60_000), np.uint8))
        sent = [tensor]
    else:
        sent = fp32((1, 30_000), dtype="FP64")
    error = await refused(aio.infer(model, sent))
    assert error.message() == message
    assert decoded_inputs == []


def test_a_64_mib_bytes_flood_is_refused_by_the_default_caps(
    standard_server: ServerThread,
) -> None:
    """Default settings: 10 million two-byte BYTES elements (60 MB, within the 64 MiB message
    limit) are refused by --max-bytes-elements, for a known model and an unknown one."""
    count = 10_000_000
    raw = b"\x02\x00\x00\x00ab" * count
    with grpc.insecure_channel(standard_server.url, options=[
            ("grpc.max_send_message_length", 64 * 1024 * 1024)]) as opened:
        infer = opened.unary_unary(INFER, request_serializer=identity,
                                   response_deserializer=identity)
        for model in ("identity_bytes", "no_such_model"):
            message = pb.ModelInferRequest(model_name=model)
            message.inputs.add(name="INPUT0", datatype="BYTES", shape=[1, count])
            message.raw_input_contents.append(raw)
            with pytest.raises(grpc.RpcError) as caught:
                infer(message.SerializeToString(), timeout=30)
            assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert caught.value.details() == (
                f"the request has {count} BYTES elements; the server takes at most 1048576 "
                "per request (--max-bytes-elements)")


def test_a_message_of_tiny_entries_is_refused_by_the_entry_bound(
    standard_server: ServerThread,
) -> None:
    """Two million empty inputs (4 MB on the wire, hundreds of MB if each were built): refused
    RESOURCE_EXHAUSTED naming the bound, and counted."""
    empty_input = b"\x2a\x00"  # field 5 (inputs), length 0
    flood = (pb.ModelInferRequest(model_name="no_such_model").SerializeToString()
             + empty_input * 2_000_000)
    before = refusals(standard_server).get("max_request_entries", 0.0)
    with grpc.insecure_channel(standard_server.url) as opened:
        infer = opened.unary_unary(INFER, request_serializer=identity,
                                   response_deserializer=identity)
        with pytest.raises(grpc.RpcError) as caught:
            infer(flood, timeout=30)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert caught.value.details() == (
        "the request holds more than 65536 entries (inputs, outputs, raw contents, "
        "parameters, shape dims); the server takes at most 65536")
    assert refusals(standard_server)["max_request_entries"] == before + 1


# -- ragged padding ------------------------------------------------------------------------------


def ragged_input(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def batch_sizes(server: ServerThread) -> list[int]:
    with grpcclient.InferenceServerClient(server.url) as client:
        (stats,) = client.get_inference_statistics("ragged", "1").model_stats
    return sorted(b.batch_size for b in stats.batch_stats for _ in range(b.compute_infer.count))


async def test_ragged_requests_of_crossed_extents_are_not_padded_together(
    server: ServerThread, aio: aioclient.InferenceServerClient, gate: Gate
) -> None:
    """[1, 1, 30000] and [1, 30000, 1] queue together behind a held batch; padded together
    they would make a 2 x 30000 x 30000 batch (7.2 GB). Each goes alone, both answered."""
    rng = np.random.default_rng(5)
    first = asyncio.ensure_future(aio.infer("ragged", ragged_input(np.ones((1, 1, 1), np.float32))))
    await until(lambda: queued(server, "ragged") == 1, "a batch held at the instance")
    wide = rng.standard_normal((1, 1, 30_000)).astype(np.float32)
    tall = rng.standard_normal((1, 30_000, 1)).astype(np.float32)
    # Two of similar extents, sent after them, share a batch (the test's control).
    alike = [rng.standard_normal((1, 2, n)).astype(np.float32) for n in (3, 4)]
    pair = [asyncio.ensure_future(aio.infer("ragged", ragged_input(x))) for x in (wide, tall)]
    await until(lambda: queued(server, "ragged") == 3, "the pair queued")
    similar = [asyncio.ensure_future(aio.infer("ragged", ragged_input(x))) for x in alike]
    await until(lambda: queued(server, "ragged") == 5, "the similar pair queued")
    gate.open()
    await first
    for x, result in zip((wide, tall, *alike), await asyncio.gather(*pair, *similar),
                         strict=True):
        np.testing.assert_array_equal(result.as_numpy("DOUBLED"), 2 * x)
        np.testing.assert_allclose(result.as_numpy("TOTAL").ravel(), [x.sum()], rtol=1e-4)
    assert batch_sizes(server) == [1, 1, 1, 2]


# -- calls waiting for a busy event loop --------------------------------------------------------


def test_calls_past_the_pending_bound_are_cancelled_by_grpc_while_the_loop_is_busy(
    tmp_path: Path,
) -> None:
    """--grpc-max-pending-calls 2: while the server's event loop is held (a callback sleeping
    on it), 24 calls arrive; gRPC's core cancels those past the bound at once, without the
    loop, and answers the rest once the loop is free. Nothing else fails; the server goes
    on answering."""
    model_factory.identity_model(tmp_path, "identity_fp32", "FP32")
    held_s = 1.5
    # One process: the loop held is the one gRPC hands calls to (a frontend's is not held).
    with ServerThread(tmp_path, grpc_max_pending_calls=2, frontends=1) as server:
        assert server.server is not None and server._loop is not None
        with grpc.insecure_channel(server.url) as channel:
            live = channel.unary_unary("/inference.GRPCInferenceService/ServerLive",
                                       request_serializer=pb.ServerLiveRequest.SerializeToString,
                                       response_deserializer=pb.ServerLiveResponse.FromString)
            live(pb.ServerLiveRequest(), timeout=10)  # connected
            server._loop.call_soon_threadsafe(time.sleep, held_s)
            time.sleep(0.1)
            sent = time.monotonic()
            done_after: dict[int, float] = {}

            def record(call: grpc.Future) -> None:
                done_after[id(call)] = time.monotonic() - sent

            calls = [live.future(pb.ServerLiveRequest(), timeout=30) for _ in range(24)]
            for call in calls:
                call.add_done_callback(record)
            codes = [call.code() for call in calls]
            cancelled_within = [done_after[id(call)] for call in calls
                                if call.code() is grpc.StatusCode.CANCELLED]
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.CANCELLED}
            assert codes.count(grpc.StatusCode.OK) >= 2
            assert cancelled_within and max(cancelled_within) < held_s - 0.3
            assert live(pb.ServerLiveRequest(), timeout=10).live
        with grpcclient.InferenceServerClient(server.url) as client:
            result = client.infer("identity_fp32", fp32((1, 4)))
            assert result.as_numpy("OUTPUT0").shape == (1, 4)


# -- predicted queue wait ------------------------------------------------------------------------


def test_requests_whose_predicted_wait_is_past_max_queue_wait_ms_are_refused_at_once(
    tmp_path: Path,
) -> None:
    """A model taking ~40 ms a row with max_queue_wait_ms 100: after two answers have taught
    the batcher its time per row, 12 requests sent at once are answered while the rows queued
    ahead of them predict at most 100 ms of waiting, and refused at once beyond that (before
    the first of them is answered), with the bound named and counted."""
    model = model_factory.slow_model(tmp_path, "slow", delay_ms=40.0, max_batch_size=1)
    config = model / "config.pbtxt"
    config.write_text(config.read_text(encoding="utf-8") + 'parameters { key: '
                      '"max_queue_wait_ms" value { string_value: "100" } }\n', encoding="utf-8")
    x = np.arange(256, dtype=np.float32).reshape(1, 256)
    with ServerThread(tmp_path) as server, grpcclient.InferenceServerClient(server.url) as client:
        sent = [grpcclient.InferInput("INPUT0", [1, 256], "FP32")]
        sent[0].set_data_from_numpy(x)
        for _ in range(2):
            client.infer("slow", sent)
        outcomes: list[tuple[str, float, str]] = []
        lock = threading.Lock()
        start = time.monotonic()

        def done(result: Any, error: InferenceServerException | None) -> None:
            with lock:
                outcomes.append(("OK" if error is None else str(error.status()),
                                 time.monotonic() - start,
                                 "" if error is None else error.message()))

        for _ in range(12):
            client.async_infer("slow", sent, done)
        deadline = time.monotonic() + 30
        while len(outcomes) < 12 and time.monotonic() < deadline:
            time.sleep(0.01)
        answered = [o for o in outcomes if o[0] == "OK"]
        refused_ = [o for o in outcomes if o[0] != "OK"]
        assert len(outcomes) == 12
        assert 2 <= len(answered) <= 6, outcomes
        assert {o[0] for o in refused_} == {"StatusCode.RESOURCE_EXHAUSTED"}
        assert max(o[1] for o in refused_) < min(o[1] for o in answered)
        assert all("the bound is 100 ms (max_queue_wait_ms)" in o[2] for o in refused_)
        assert refusals(server)["max_queue_wait_ms"] == len(refused_)
        assert client.infer("slow", sent).as_numpy("OUTPUT0").shape == (1, 256)
