"""OpenTelemetry tracing end to end (issue 21 item 2): a real server with --trace-config
exporting over OTLP/gRPC to a real receiver started here on loopback, requests sent by
tritonclient with a W3C traceparent. Checks the spans and their parents, sampling (the
caller's flag, the rate), errors, streams and TraceSetting; and that a server without
tracing runs no tracing code at all.
"""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.otlp_receiver import OtlpReceiver
from tests.server_harness import ServerThread

BATCH = 3


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory,
           receiver: OtlpReceiver) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("tracing")
    model_factory.add_sub_model(repo, "add_sub")
    # Three requests sent together always run as one batch of three.
    model_factory.add_sub_model(repo, "batched", max_queue_delay_microseconds=30_000_000,
                                preferred_batch_size=[BATCH], queue_delay="fixed")
    model_factory.failing_model(repo, "failing")
    # rate=0: only requests whose caller sampled them, until a test sets a rate. One span per
    # export batch, so each trace leaves at once.
    trace_config = ("mode=opentelemetry", "level=TIMESTAMPS", "rate=0",
                    f"opentelemetry,url={receiver.url}", "opentelemetry,resource=team=search",
                    "opentelemetry,bsp_max_export_batch_size=1")
    with ServerThread(repo, trace_config=trace_config, allow_http=True) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


# -- helpers ----------------------------------------------------------------------------------


def traceparent(sampled: bool = True) -> tuple[str, bytes, bytes]:
    """A caller's traceparent header, with its trace id and span id."""
    trace_id, span_id = secrets.token_bytes(16), secrets.token_bytes(8)
    return (f"00-{trace_id.hex()}-{span_id.hex()}-{'01' if sampled else '00'}", trace_id,
            span_id)


def add_sub_inputs(rows: int = 1, width: int = 16) -> list[grpcclient.InferInput]:
    data = np.ones((rows, width), dtype=np.float32)
    inputs = []
    for name in ("INPUT0", "INPUT1"):
        tensor = grpcclient.InferInput(name, [rows, width], "FP32")
        tensor.set_data_from_numpy(data)
        inputs.append(tensor)
    return inputs


def failing_inputs() -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, 16], "FP32")
    tensor.set_data_from_numpy(np.ones((1, 16), dtype=np.float32))
    return [tensor]


def attributes(span: Span) -> dict[str, Any]:
    return {kv.key: kv.value.string_value if kv.value.HasField("string_value")
            else kv.value.int_value for kv in span.attributes}


def of_trace(spans: list[Span], trace_id: bytes) -> list[Span]:
    return [s for s in spans if s.trace_id == trace_id]


def requests_of(spans: list[Span]) -> list[Span]:
    return [s for s in spans if s.name == "InferRequest"]


def one(spans: list[Span], name: str) -> Span:
    named = [s for s in spans if s.name == name]
    assert len(named) == 1, [s.name for s in spans]
    return named[0]


def wait_for_trace(receiver: OtlpReceiver, trace_id: bytes, requests: int = 1,
                   spans: int = 0) -> list[Span]:
    """The spans of ``trace_id`` once ``requests`` request spans (and their ``spans`` in
    all, when given) arrived."""
    def found(received: list[Span]) -> bool:
        mine = of_trace(received, trace_id)
        return len(requests_of(mine)) >= requests and len(mine) >= spans

    return of_trace(receiver.wait_for(found, f"trace {trace_id.hex()}"), trace_id)


# -- the spans of a request -------------------------------------------------------------------


def test_a_request_continues_its_callers_trace(server: ServerThread, receiver: OtlpReceiver,
                                               client: grpcclient.InferenceServerClient) -> None:
    header, trace_id, caller_span = traceparent()
    client.infer("add_sub", add_sub_inputs(2), request_id="r-1",
                 headers={"traceparent": header, "tracestate": "vendor=abc"})
    spans = wait_for_trace(receiver, trace_id, spans=5)
    assert sorted(s.name for s in spans) == ["InferRequest", "batch", "compute", "encode",
                                             "queue"]
    request = one(spans, "InferRequest")
    assert request.parent_span_id == caller_span
    assert request.kind == Span.SPAN_KIND_SERVER
    assert request.trace_state == "vendor=abc"
    assert request.status.code == Status.STATUS_CODE_UNSET
    assert attributes(request) == {
        "model_name": "add_sub", "model_version": "1", "request_id": "r-1",
        "rpc.system": "grpc", "rpc.service": "inference.GRPCInferenceService",
        "rpc.method": "ModelInfer", "rpc.grpc.status_code": 0}
    batch = one(spans, "batch")
    compute = one(spans, "compute")
    for child in ("queue", "batch", "encode"):
        assert one(spans, child).parent_span_id == request.span_id
    assert compute.parent_span_id == batch.span_id
    assert attributes(batch) == {"model_name": "add_sub", "model_version": "1",
                                 "batch_size": 2, "batch_requests": 1}
    assert attributes(compute)["batch_size"] == 2
    assert [e.name for e in compute.events] == ["COMPUTE_START", "COMPUTE_INPUT_END",
                                                "COMPUTE_OUTPUT_START", "COMPUTE_END"]
    # The pieces follow one another inside the request.
    queue_span, encode = one(spans, "queue"), one(spans, "encode")
    assert request.start_time_unix_nano <= queue_span.start_time_unix_nano
    assert queue_span.end_time_unix_nano == batch.start_time_unix_nano
    assert batch.start_time_unix_nano <= compute.start_time_unix_nano
    assert compute.end_time_unix_nano <= batch.end_time_unix_nano
    assert batch.end_time_unix_nano <= encode.start_time_unix_nano
    assert encode.end_time_unix_nano <= request.end_time_unix_nano
    assert {"service.name": "peregrine", "team": "search"} in receiver.resources


def test_a_rest_request_continues_its_callers_trace_from_its_headers(
        server: ServerThread, receiver: OtlpReceiver) -> None:
    header, trace_id, caller_span = traceparent()
    body = json.dumps({"id": "rest-1", "inputs": [
        {"name": name, "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 16}
        for name in ("INPUT0", "INPUT1")]}).encode()
    request = urllib.request.Request(
        f"http://{server.http_url}/v2/models/add_sub/infer", data=body, method="POST",
        headers={"Content-Type": "application/json", "traceparent": header})
    with urllib.request.urlopen(request, timeout=30) as response:
        assert json.loads(response.read())["outputs"][0]["data"] == [2.0] * 16
    spans = wait_for_trace(receiver, trace_id, spans=5)
    request_span = one(spans, "InferRequest")
    assert request_span.parent_span_id == caller_span
    assert attributes(request_span)["request_id"] == "rest-1"


def test_each_request_of_a_batch_gets_the_batch_in_its_own_trace(
        server: ServerThread, receiver: OtlpReceiver) -> None:
    callers = [traceparent() for _ in range(BATCH)]

    async def send() -> None:
        async with aioclient.InferenceServerClient(server.url) as aio:
            await asyncio.gather(*(aio.infer("batched", add_sub_inputs(), request_id=f"b-{i}",
                                             headers={"traceparent": header})
                                   for i, (header, _, _) in enumerate(callers)))

    asyncio.run(send())
    batches = [one(wait_for_trace(receiver, trace_id, spans=5), "batch")
               for _, trace_id, _ in callers]
    assert {attributes(b)["batch_requests"] for b in batches} == {BATCH}
    assert {attributes(b)["batch_size"] for b in batches} == {BATCH}
    assert len({(b.start_time_unix_nano, b.end_time_unix_nano) for b in batches}) == 1
    assert len({b.span_id for b in batches}) == BATCH


# -- sampling ---------------------------------------------------------------------------------


def test_sampling_follows_the_caller_else_the_rate(
        server: ServerThread, receiver: OtlpReceiver,
        client: grpcclient.InferenceServerClient) -> None:
    unsampled, unsampled_trace, _ = traceparent(sampled=False)
    # rate=0: neither a request without a caller's context nor one its caller did not sample.
    client.infer("add_sub", add_sub_inputs(), request_id="none-1")
    client.infer("add_sub", add_sub_inputs(), request_id="none-2",
                 headers={"traceparent": unsampled})
    # 1 in 3 by rate: the third of three; a caller's unsampled context is continued then.
    client.update_trace_settings(settings={"trace_rate": "3"})
    try:
        client.infer("add_sub", add_sub_inputs(), request_id="rate-1")
        client.infer("add_sub", add_sub_inputs(), request_id="rate-2")
        client.infer("add_sub", add_sub_inputs(), request_id="rate-3",
                     headers={"traceparent": unsampled})
    finally:
        client.update_trace_settings(settings={"trace_rate": []})  # back to the start's 0
    assert client.get_trace_settings().settings["trace_rate"].value == ["0"]
    # A caller that sampled its trace is followed whatever the rate; it is sent last, and
    # traces leave in order, so anything traced before it has arrived with it.
    marker, marker_trace, _ = traceparent()
    client.infer("add_sub", add_sub_inputs(), request_id="marker", headers={"traceparent": marker})
    wait_for_trace(receiver, marker_trace)
    traced = {attributes(s)["request_id"]: s for s in requests_of(receiver.spans)}
    assert {"none-1", "none-2", "rate-1", "rate-2"}.isdisjoint(traced)
    assert traced["rate-3"].trace_id == unsampled_trace
    assert traced["marker"].trace_id == marker_trace


def test_a_malformed_traceparent_is_ignored(server: ServerThread, receiver: OtlpReceiver,
                                            client: grpcclient.InferenceServerClient) -> None:
    header, trace_id, _ = traceparent()
    client.infer("add_sub", add_sub_inputs(), request_id="malformed",
                 headers={"traceparent": header.upper()})  # hex must be lowercase
    marker, marker_trace, _ = traceparent()
    client.infer("add_sub", add_sub_inputs(), headers={"traceparent": marker})
    spans = receiver.wait_for(lambda s: bool(of_trace(s, marker_trace)), "the marker")
    assert not of_trace(spans, trace_id)
    assert "malformed" not in {attributes(s)["request_id"] for s in requests_of(spans)}


# -- errors and streams -----------------------------------------------------------------------


def test_a_failed_request_has_an_error_status(server: ServerThread, receiver: OtlpReceiver,
                                              client: grpcclient.InferenceServerClient) -> None:
    header, trace_id, _ = traceparent()
    with pytest.raises(InferenceServerException):
        client.infer("failing", failing_inputs(), request_id="f-1",
                     headers={"traceparent": header})
    request = one(wait_for_trace(receiver, trace_id, spans=3), "InferRequest")
    assert request.status.code == Status.STATUS_CODE_ERROR
    assert "failed to run the batch" in request.status.message
    assert attributes(request)["rpc.grpc.status_code"] == 13  # INTERNAL
    # A request refused before it is queued: the request span alone, with its status.
    header, trace_id, _ = traceparent()
    with pytest.raises(InferenceServerException):
        client.infer("no_such_model", add_sub_inputs(), headers={"traceparent": header})
    spans = wait_for_trace(receiver, trace_id)
    assert [s.name for s in spans] == ["InferRequest"]
    assert attributes(spans[0])["rpc.grpc.status_code"] == 5  # NOT_FOUND
    assert spans[0].status.code == Status.STATUS_CODE_ERROR
    # Bytes that do not decode: sampled when the call began, so traced all the same.
    header, trace_id, _ = traceparent()
    with grpc.insecure_channel(server.url) as channel:
        call = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError):
            call(b"\xff\xff\xff", metadata=(("traceparent", header),), timeout=10)
    request = one(wait_for_trace(receiver, trace_id), "InferRequest")
    assert attributes(request)["rpc.grpc.status_code"] == 3  # INVALID_ARGUMENT
    assert "malformed" in request.status.message


def test_streamed_requests_are_traced_one_by_one(server: ServerThread, receiver: OtlpReceiver,
                                                 client: grpcclient.InferenceServerClient
                                                 ) -> None:
    header, trace_id, caller_span = traceparent()
    answers: queue.Queue[Any] = queue.Queue()
    client.start_stream(lambda result, error: answers.put((result, error)),
                        headers={"traceparent": header})
    try:
        for index in range(3):
            client.async_stream_infer("add_sub", add_sub_inputs(), request_id=f"s-{index}")
        client.async_stream_infer("failing", failing_inputs(), request_id="s-bad")
        outcomes = [answers.get(timeout=30) for _ in range(4)]
    finally:
        client.stop_stream()
    assert sum(error is not None for _, error in outcomes) == 1
    spans = wait_for_trace(receiver, trace_id, requests=4)
    requests = {attributes(s)["request_id"]: s for s in requests_of(spans)}
    assert set(requests) == {"s-0", "s-1", "s-2", "s-bad"}
    for request in requests.values():
        assert request.parent_span_id == caller_span
        assert attributes(request)["rpc.method"] == "ModelStreamInfer"
    assert requests["s-bad"].status.code == Status.STATUS_CODE_ERROR
    assert attributes(requests["s-bad"])["rpc.grpc.status_code"] == 13
    assert requests["s-0"].status.code == Status.STATUS_CODE_UNSET
    # Each streamed request has its own children.
    spans = wait_for_trace(receiver, trace_id, requests=4, spans=3 * 5 + 3)
    encodes = [s for s in spans if s.name == "encode"]
    assert {e.parent_span_id for e in encodes} == {requests[f"s-{i}"].span_id for i in range(3)}


# -- settings and counts ----------------------------------------------------------------------


def test_trace_settings_are_reported_and_checked(server: ServerThread,
                                                 client: grpcclient.InferenceServerClient
                                                 ) -> None:
    settings = {key: list(value.value)
                for key, value in client.get_trace_settings().settings.items()}
    assert settings == {"trace_mode": ["opentelemetry"], "trace_level": ["TIMESTAMPS"],
                        "trace_rate": ["0"], "trace_count": ["-1"]}
    for bad, words in (({"trace_rate": "-1"}, "at least 0"),
                       ({"trace_file": "/tmp/t.json"}, "trace file mode"),
                       ({"trace_level": "TENSORS"}, "TENSORS"),
                       ({"trace_colour": "red"}, "unknown trace setting")):
        with pytest.raises(InferenceServerException, match=words):
            client.update_trace_settings(settings=bad)
    with pytest.raises(InferenceServerException, match="per-model"):
        client.update_trace_settings(model_name="add_sub", settings={"trace_rate": "5"})
    assert client.get_trace_settings().settings["trace_rate"].value == ["0"]
    assert "trace" in client.get_server_metadata().extensions


def test_exported_spans_are_counted(server: ServerThread, receiver: OtlpReceiver,
                                    client: grpcclient.InferenceServerClient) -> None:
    header, trace_id, _ = traceparent()
    client.infer("add_sub", add_sub_inputs(), headers={"traceparent": header})
    wait_for_trace(receiver, trace_id, spans=5)
    exported = server.metric("peregrine_trace_spans_total", outcome="exported")
    assert exported is not None and exported >= 5
    assert server.metric("peregrine_trace_spans_total", outcome="dropped") == 0


# -- tracing off ------------------------------------------------------------------------------


def test_without_tracing_no_tracing_code_runs(tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Every entry point of tracing on the request path raises if called, and reading or
    writing a request's trace raises: requests still pass, unary and streamed."""
    from server.frontend import tracing as frontend_tracing
    from server.tracing import codec, trace
    from server.types import InferRequest

    def sentinel(*args: object, **kwargs: object) -> Any:
        raise AssertionError("tracing code ran on a server without tracing")

    for owner, name in ((trace.Tracer, "enter_unary"), (trace.Tracer, "enter_stream"),
                        (trace.Tracer, "begin_request"),
                        (trace.Tracer, "batch_done"), (trace, "current_request"),
                        (codec.TracedCodec, "decode_request_bytes"),
                        (codec.TracedCodec, "encode_response_bytes"),
                        (frontend_tracing, "traced_handlers")):
        monkeypatch.setattr(owner, name, sentinel)
    monkeypatch.setattr(InferRequest, "trace", property(sentinel, sentinel))
    model_factory.add_sub_model(tmp_path, "add_sub")
    with ServerThread(tmp_path) as plain:
        assert plain.server is not None and plain.server.tracer is None
        with grpcclient.InferenceServerClient(plain.url) as client:
            header, _, _ = traceparent()
            result = client.infer("add_sub", add_sub_inputs(), headers={"traceparent": header})
            assert result.as_numpy("OUTPUT0") is not None
            answers: queue.Queue[Any] = queue.Queue()
            client.start_stream(lambda result, error: answers.put(error),
                                headers={"traceparent": header})
            try:
                client.async_stream_infer("add_sub", add_sub_inputs())
                assert answers.get(timeout=30) is None
            finally:
                client.stop_stream()
            with pytest.raises(InferenceServerException, match="not configured"):
                client.update_trace_settings(settings={"trace_rate": "1"})
            assert client.get_trace_settings().settings["trace_level"].value == ["OFF"]
