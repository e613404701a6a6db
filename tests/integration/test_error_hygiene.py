"""Error hygiene through a real server (security issue, item 7): a client never sees a path of
the server's file system, the backend's own message or a traceback. A failed run answers which
model version failed with a correlation id, and the server's log line with that id holds the
detail; reasons name files relative to the model directory; a request id cannot forge a log
line."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.logs import JsonFormatter, TextFormatter
from tests import model_factory
from tests.server_harness import ServerThread

FAILED_RUN = re.compile(
    r"^model 'failing' version 1 failed to run the batch \(correlation id ([0-9a-f]+)\)$")
FORGED_ID = "abc\ninfo fake line\x1b[31m"


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("hygiene")
    model_factory.failing_model(repo, "failing")
    model_factory.broken_model(repo, "broken")
    return repo


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, model_control_mode="explicit", load_model=("failing", "broken"),
                      strict_readiness=False) as running:
        yield running


def request(request_id: str = "") -> pb.ModelInferRequest:
    """One row: the failing model's graph cannot reshape it (see failing_model)."""
    message = pb.ModelInferRequest(model_name="failing", id=request_id)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 16])
    message.raw_input_contents.append(np.ones(16, dtype=np.float32).tobytes())
    return message


def logged(caplog: pytest.LogCaptureFixture, correlation: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "correlation_id", None) == correlation]


def test_a_failed_run_answers_a_correlation_id_and_the_log_has_the_detail(
    server: ServerThread, repo: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ModelInfer(request(), timeout=10)
        [streamed] = list(stub.ModelStreamInfer(iter([request("s1")]), timeout=10))
    assert err.value.code() == grpc.StatusCode.INTERNAL
    unary = FAILED_RUN.match(str(err.value.details()))
    assert unary, err.value.details()
    assert streamed.error_message.startswith("[INTERNAL] ")
    stream = FAILED_RUN.match(streamed.error_message.removeprefix("[INTERNAL] "))
    assert stream, streamed.error_message
    assert unary.group(1) != stream.group(1)
    for correlation in (unary.group(1), stream.group(1)):
        [record] = logged(caplog, correlation)
        assert record.getMessage() == "backend failed"
        # The detail the client did not get: onnxruntime's own message and the traceback.
        assert "Reshape" in record.error  # type: ignore[attr-defined]
        assert record.exc_info is not None


def test_reasons_and_load_errors_name_files_relative_to_the_model(
    server: ServerThread, repo: Path
) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        reasons = {m.name: m.reason for m in client.get_model_repository_index().models}
        with pytest.raises(InferenceServerException) as err:
            client.load_model("broken")
    for text in (reasons["broken"], err.value.message()):
        assert "'1/model.onnx'" in text, text
        assert str(repo) not in text and str(repo.resolve()) not in text, text


def test_a_request_id_cannot_forge_a_log_line(
    server: ServerThread, caplog: pytest.LogCaptureFixture
) -> None:
    """The stream's failure is logged with the request's id (the client's text)."""
    with grpc.insecure_channel(server.url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        [answer] = list(stub.ModelStreamInfer(iter([request(FORGED_ID)]), timeout=10))
    assert answer.error_message.startswith("[INTERNAL] ")
    [record] = [r for r in caplog.records if getattr(r, "request_id", None) == FORGED_ID]
    text = TextFormatter().format(record)
    assert "\n" not in text and "\x1b" not in text, text
    assert 'request_id="abc\\ninfo fake line\\u001b[31m"' in text
    as_json = JsonFormatter().format(record)
    assert "\n" not in as_json and "\x1b" not in as_json
    assert json.loads(as_json)["request_id"] == FORGED_ID
