"""A request's message is freed when its call ends, not when the garbage collector next
runs (issue 14: a flood of large refused requests grew the server by gigabytes).

A refusal used to raise through ``context.abort``: gRPC keeps that exception on the call's
state while its traceback holds the handler's frames (the request bytes among their locals)
and the context (so the call's state), a cycle. An error from a failed batch was held by
the frames that ran the batch and that took it from the request's future, in cycles too.
An HTTP connection kept its last request's body, and once closed stayed in a cycle with its
parser. Each test turns the collector off and counts, with tracemalloc, the Python memory
still allocated after a run of calls of a few MiB each: with a cycle it is every message's
size, without one about nothing. The server runs in this process
(tests/server_harness.py), so tracemalloc sees its allocations (with --frontends, the
engine's).
"""

from __future__ import annotations

import gc
import http.client
import json
import logging
import os
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests import model_factory
from tests.integration.test_auth import add_identity
from tests.server_harness import ServerThread

MIB = 1 << 20
#: Each refused message's size, and how many are sent.
MESSAGE = 4 * MIB
CALLS = 8


def large_request(model: str) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, MESSAGE // 4])
    message.raw_input_contents.append(bytes(MESSAGE))
    return message


def padded_request(model: str) -> pb.ModelInferRequest:
    """One valid row of 16 FP32 for ``model``, and MESSAGE bytes of a request parameter."""
    message = pb.ModelInferRequest(model_name=model)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    message.raw_input_contents.append(bytes(64))
    message.parameters["padding"].string_param = "x" * MESSAGE
    return message


def retained_after(calls: Callable[[], None]) -> int:
    """Python memory (bytes) still allocated after ``calls``, with the collector off and
    logging off: pytest keeps every log record of a test for its report, and a record of a
    failed batch holds the traceback of the failure, so the batch."""
    gc.collect()
    gc.disable()
    logging.disable(logging.CRITICAL)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        calls()
        return tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
        logging.disable(logging.NOTSET)
        gc.enable()


def refused_calls(url: str, model: str, code: grpc.StatusCode,
                  metadata: tuple[tuple[str, str], ...] = (),
                  request: pb.ModelInferRequest | None = None) -> Callable[[], None]:
    request = request or large_request(model)

    def run() -> None:
        with grpc.insecure_channel(url, options=[
                ("grpc.max_send_message_length", 2 * MESSAGE)]) as channel:
            infer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer
            for _ in range(CALLS):
                with pytest.raises(grpc.RpcError) as refused:
                    infer(request, metadata=metadata, timeout=30)
                assert refused.value.code() == code, refused.value.details()

    return run


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("refusal_memory")
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    model_factory.failing_model(repo, "failing")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, allow_http=True) as running:
        yield running


def test_requests_to_an_unknown_model_are_freed_when_refused(server: ServerThread) -> None:
    retained = retained_after(refused_calls(server.url, "no_such_model",
                                            grpc.StatusCode.NOT_FOUND))
    assert retained < 2 * MESSAGE, f"{retained / MIB:.1f} MiB still allocated"


def test_requests_whose_batch_failed_are_freed(server: ServerThread) -> None:
    """The error comes from the batch, through the request's future: the executor's and the
    servicer's frames both held it, and the request, in cycles."""
    retained = retained_after(refused_calls(server.url, "failing", grpc.StatusCode.INTERNAL,
                                            request=padded_request("failing")))
    assert retained < 2 * MESSAGE, f"{retained / MIB:.1f} MiB still allocated"


def test_streamed_requests_whose_batch_failed_are_freed(server: ServerThread) -> None:
    """A stream answers a failed request in an error message, taken from its future in a
    callback whose frame held the future."""
    request = padded_request("failing")

    def run() -> None:
        with grpc.insecure_channel(server.url, options=[
                ("grpc.max_send_message_length", 2 * MESSAGE)]) as channel:
            stream = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer
            answers = list(stream(iter([request] * CALLS), timeout=30))
        assert len(answers) == CALLS
        assert all("INTERNAL" in a.error_message for a in answers), answers[0].error_message

    retained = retained_after(run)
    assert retained < 2 * MESSAGE, f"{retained / MIB:.1f} MiB still allocated"


def test_requests_past_a_bound_are_freed_when_refused(repo: Path) -> None:
    with ServerThread(repo, max_request_bytes=MIB) as server:
        retained = retained_after(refused_calls(server.url, "identity_fp32",
                                                grpc.StatusCode.RESOURCE_EXHAUSTED))
    assert retained < 2 * MESSAGE, f"{retained / MIB:.1f} MiB still allocated"


def test_requests_the_guard_refuses_are_freed(repo: Path, tmp_path: Path) -> None:
    auth_file = tmp_path / "auth.toml"
    token = add_identity(auth_file, "monitor-svc", "--roles", "monitor")
    with ServerThread(repo, auth_file=auth_file, audit_log=tmp_path / "audit.jsonl") as server:
        unauthenticated = retained_after(refused_calls(
            server.url, "identity_fp32", grpc.StatusCode.UNAUTHENTICATED))
        not_allowed = retained_after(refused_calls(
            server.url, "identity_fp32", grpc.StatusCode.PERMISSION_DENIED,
            (("authorization", f"Bearer {token}"),)))
    assert unauthenticated < 2 * MESSAGE, f"{unauthenticated / MIB:.1f} MiB still allocated"
    assert not_allowed < 2 * MESSAGE, f"{not_allowed / MIB:.1f} MiB still allocated"


#: With --frontends the HTTP server runs in the frontend processes, out of tracemalloc's sight.
in_this_process = pytest.mark.skipif(
    int(os.environ.get("PEREGRINE_FRONTENDS", "1")) > 1,
    reason="the HTTP server runs in the frontend processes, which tracemalloc cannot see")


def rest_body() -> bytes:
    """A valid JSON inference body for identity_fp32 with MESSAGE bytes of a parameter."""
    return json.dumps({
        "inputs": [{"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [0.0] * 16}],
        "parameters": {"padding": "x" * MESSAGE}}).encode()


def rest_calls(server: ServerThread, connection: http.client.HTTPConnection | None = None
               ) -> Callable[[], None]:
    """CALLS inferences over HTTP, each on a connection of its own, or all on
    ``connection``."""
    host, port = server.http_url.rsplit(":", 1)
    body = rest_body()

    def run() -> None:
        for _ in range(CALLS):
            client = connection or http.client.HTTPConnection(host, int(port), timeout=30)
            client.request("POST", "/v2/models/identity_fp32/infer", body=body,
                           headers={"Content-Type": "application/json"})
            answer = client.getresponse()
            assert answer.status == 200, answer.read()
            answer.read()
            if connection is None:
                client.close()

    return run


@in_this_process
def test_closed_http_connections_are_freed(server: ServerThread) -> None:
    retained = retained_after(rest_calls(server))
    assert retained < 2 * MESSAGE, f"{retained / MIB:.1f} MiB still allocated"


@in_this_process
def test_an_open_http_connection_keeps_no_answered_body(server: ServerThread) -> None:
    host, port = server.http_url.rsplit(":", 1)
    connection = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        retained = retained_after(rest_calls(server, connection))
    finally:
        connection.close()
    assert retained < MESSAGE // 2, f"{retained / MIB:.1f} MiB still allocated"
