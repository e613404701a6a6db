"""HTTP/REST (--allow-http): Triton's REST API through tritonclient.http (sync and asyncio) and
plain HTTP requests, and the REST answers compared with the gRPC answers to the same requests,
against one real server on 127.0.0.1."""

from __future__ import annotations

import base64
import gzip
import json
import re
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.server_harness import ServerThread
from tests.triton_shm import load as load_shared_memory

pytestmark = pytest.mark.timeout(60)

DATATYPES = ("FP32", "FP16", "BYTES", "INT8", "BOOL", "UINT64", "BF16", "FP64")
MESSAGE_LIMIT = 4 << 20
SAMPLES: dict[str, np.ndarray[Any, Any]] = {
    "FP32": np.arange(6, dtype=np.float32).reshape(2, 3) / 4,
    "FP16": (np.arange(6, dtype=np.float16).reshape(2, 3) - 2.5),
    "BYTES": np.array([[b"plain", "h\u00e9llo \u2713".encode(), b""]], dtype=object),
    "INT8": np.array([[-128, -1, 0, 127]], dtype=np.int8),
    "BOOL": np.array([[True, False, True]]),
    "UINT64": np.array([[0, 2**63 + 5, 2**64 - 1]], dtype=np.uint64),
    "BF16": np.array([[1.0, -2.5, 3.0]], dtype=np.float32),
    "FP64": np.array([[1e300, -0.0]], dtype=np.float64),
}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("http_repo")
    for datatype in DATATYPES:
        model_factory.identity_model(repo, f"identity_{datatype.lower()}", datatype)
    model_factory.add_sub_model(repo, "add_sub")
    model_factory.add_sub_model(repo, "spare")
    with ServerThread(repo, allow_http=True, model_control_mode="explicit",
                      load_model=("*",), allow_client_shm=True,
                      grpc_max_message_bytes=MESSAGE_LIMIT) as running:
        yield running


class _ClosedOnce(httpclient.InferenceServerClient):  # type: ignore[misc]
    """tritonclient's client closes again when collected, and gevent refuses that on any
    thread but the one that made it: collection may run on the server's thread."""

    def __del__(self) -> None:
        pass


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[httpclient.InferenceServerClient]:
    with _ClosedOnce(server.http_url) as c:
        yield c


@pytest.fixture(scope="module")
def grpc_client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def request(server: ServerThread, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """A plain HTTP request (urllib); the status, headers and body, errors included."""
    sent = urllib.request.Request(f"http://{server.http_url}{path}", data=body,
                                  headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(sent, timeout=30) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def add_sub_inputs(module: Any, binary: bool = True) -> list[Any]:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    inputs = [module.InferInput("INPUT0", [1, 16], "FP32"),
              module.InferInput("INPUT1", [1, 16], "FP32")]
    if module is httpclient:
        inputs[0].set_data_from_numpy(a, binary_data=binary)
        inputs[1].set_data_from_numpy(np.ones_like(a), binary_data=binary)
    else:
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(np.ones_like(a))
    return inputs


# -- health, metadata, configuration ----------------------------------------------------------


def test_health_and_readiness(client: httpclient.InferenceServerClient,
                              server: ServerThread) -> None:
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("add_sub")
    assert client.is_model_ready("add_sub", "1")
    assert not client.is_model_ready("no_such_model")
    status, _, body = request(server, "GET", "/v2/health/live")
    assert (status, body) == (200, b"")


def test_metadata_and_config_are_the_grpc_answers(
        client: httpclient.InferenceServerClient,
        grpc_client: grpcclient.InferenceServerClient) -> None:
    assert client.get_server_metadata() == grpc_client.get_server_metadata(as_json=True)
    rest = client.get_model_metadata("add_sub")
    over_grpc = grpc_client.get_model_metadata("add_sub", as_json=True)
    assert rest["name"] == over_grpc["name"] == "add_sub"
    assert rest["versions"] == over_grpc["versions"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in rest["inputs"]] == \
        [(t["name"], t["datatype"], [int(d) for d in t["shape"]]) for t in over_grpc["inputs"]]
    config = client.get_model_config("add_sub")
    assert config["name"] == "add_sub" and config["max_batch_size"] == 8
    assert [t["dims"] for t in config["input"]] == [[16], [16]]  # 64-bit as JSON numbers
    assert config["input"][0]["data_type"] == "TYPE_FP32"


# -- inference ------------------------------------------------------------------------------------


@pytest.mark.parametrize("datatype", DATATYPES)
def test_every_datatype_round_trips_as_json_and_binary(
        client: httpclient.InferenceServerClient, datatype: str) -> None:
    sample = SAMPLES[datatype]
    for binary in (True, False):
        if datatype == "BF16" and not binary:
            continue  # tritonclient sends BF16 as binary only
        tensor = httpclient.InferInput("INPUT0", list(sample.shape), datatype)
        tensor.set_data_from_numpy(sample, binary_data=binary)
        result = client.infer(f"identity_{datatype.lower()}", [tensor], outputs=[
            httpclient.InferRequestedOutput("OUTPUT0", binary_data=binary)])
        got = result.as_numpy("OUTPUT0")
        if datatype == "BYTES" and not binary:
            # A JSON answer holds strings; tritonclient hands them back as they are.
            assert got.tolist() == [[v.decode() for v in row] for row in sample.tolist()]
        else:
            assert np.array_equal(got, sample), (binary, got, sample)
        assert got.shape == sample.shape


def test_each_requested_output_is_binary_or_json_as_asked(
        client: httpclient.InferenceServerClient) -> None:
    result = client.infer("add_sub", add_sub_inputs(httpclient), outputs=[
        httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
        httpclient.InferRequestedOutput("OUTPUT1", binary_data=False)])
    outputs = {o["name"]: o for o in result.get_response()["outputs"]}
    assert outputs["OUTPUT0"]["parameters"]["binary_data_size"] == 64
    assert "data" not in outputs["OUTPUT0"]
    assert outputs["OUTPUT1"]["data"] == [-1.0] * 0 + list(np.arange(16) - 1.0)
    assert np.array_equal(result.as_numpy("OUTPUT0"), np.arange(16).reshape(1, 16) + 1.0)
    only = client.infer("add_sub", add_sub_inputs(httpclient), outputs=[
        httpclient.InferRequestedOutput("OUTPUT1")])
    assert [o["name"] for o in only.get_response()["outputs"]] == ["OUTPUT1"]


def test_request_id_and_compression(client: httpclient.InferenceServerClient) -> None:
    result = client.infer("add_sub", add_sub_inputs(httpclient), request_id="r-7",
                          request_compression_algorithm="gzip",
                          response_compression_algorithm="deflate")
    assert result.get_response()["id"] == "r-7"
    assert np.array_equal(result.as_numpy("OUTPUT1"), np.arange(16).reshape(1, 16) - 1.0)


async def test_the_asyncio_client(server: ServerThread) -> None:
    client = aiohttpclient.InferenceServerClient(server.http_url)
    try:
        assert await client.is_server_ready()
        assert await client.is_model_ready("add_sub")
        assert (await client.get_model_metadata("add_sub"))["name"] == "add_sub"
        inputs = [aiohttpclient.InferInput("INPUT0", [1, 16], "FP32"),
                  aiohttpclient.InferInput("INPUT1", [1, 16], "FP32")]
        a = np.arange(16, dtype=np.float32).reshape(1, 16)
        inputs[0].set_data_from_numpy(a)
        inputs[1].set_data_from_numpy(a)
        result = await client.infer("add_sub", inputs)
        assert np.array_equal(result.as_numpy("OUTPUT0"), 2 * a)
        stats = await client.get_inference_statistics("add_sub")
        assert stats["model_stats"][0]["inference_stats"]["success"]["count"] >= 1
    finally:
        await client.close()


def test_statistics_count_rest_requests(client: httpclient.InferenceServerClient) -> None:
    def successes() -> int:
        stats = client.get_inference_statistics("identity_int8", "1")["model_stats"]
        return int(stats[0]["inference_stats"]["success"]["count"])

    before = successes()
    tensor = httpclient.InferInput("INPUT0", [1, 2], "INT8")
    tensor.set_data_from_numpy(np.array([[1, 2]], dtype=np.int8))
    for _ in range(3):
        client.infer("identity_int8", [tensor])
    assert successes() == before + 3
    every = client.get_inference_statistics()["model_stats"]
    assert {"add_sub", "identity_int8"} <= {s["name"] for s in every}


def test_repository_index_load_and_unload(client: httpclient.InferenceServerClient,
                                          server: ServerThread) -> None:
    index = {(m["name"], m.get("state")) for m in client.get_model_repository_index()}
    assert ("spare", "READY") in index
    client.unload_model("spare")
    assert not client.is_model_ready("spare")
    assert ("spare", "UNAVAILABLE") in {(m["name"], m.get("state"))
                                        for m in client.get_model_repository_index()}
    config = client.get_model_config("add_sub")
    config["max_batch_size"] = 4
    config.pop("name")
    client.load_model("spare", config=json.dumps(config))
    assert client.is_model_ready("spare")
    assert client.get_model_config("spare")["max_batch_size"] == 4
    with pytest.raises(InferenceServerException) as refused:
        client.load_model("spare", config="{not json")
    assert refused.value.status() == "400" and "config override" in refused.value.message()
    with pytest.raises(InferenceServerException) as files:
        client.load_model("spare", config=json.dumps(config), files={"file:1/model.onnx": b"x"})
    assert "file:1/model.onnx" in files.value.message()
    client.load_model("spare")
    assert client.is_model_ready("spare")
    # The replaced load drains and retires (and logs it) on the server's thread: let that
    # happen within this test, not while pytest closes the test's log capture.
    assert server.server is not None
    repository = server.server.repository

    async def retiring() -> int:
        return len(repository._retiring)

    deadline = time.monotonic() + 30
    while server.call(retiring()):
        assert time.monotonic() < deadline, "the replaced load of 'spare' never retired"
        time.sleep(0.02)


def test_system_shared_memory_register_infer_unregister(
        client: httpclient.InferenceServerClient) -> None:
    shm = load_shared_memory()
    client.unregister_system_shared_memory()
    size = 64
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.full((1, 16), 2, dtype=np.float32)
    handles = [shm.create_shared_memory_region(name, f"/http_test_{name}", 2 * size)
               for name in ("in", "out")]
    try:
        shm.set_shared_memory_region(handles[0], [a, b])
        client.register_system_shared_memory("in", "/http_test_in", 2 * size)
        client.register_system_shared_memory("out", "/http_test_out", 2 * size)
        status = {r["name"]: r for r in client.get_system_shared_memory_status()}
        assert status["in"]["byte_size"] == 2 * size and status["in"]["key"] == "/http_test_in"
        inputs = [httpclient.InferInput("INPUT0", [1, 16], "FP32"),
                  httpclient.InferInput("INPUT1", [1, 16], "FP32")]
        inputs[0].set_shared_memory("in", size)
        inputs[1].set_shared_memory("in", size, offset=size)
        outputs = [httpclient.InferRequestedOutput("OUTPUT0", binary_data=True),
                   httpclient.InferRequestedOutput("OUTPUT1", binary_data=True)]
        outputs[0].set_shared_memory("out", size)
        outputs[1].set_shared_memory("out", size, offset=size)
        result = client.infer("add_sub", inputs, outputs=outputs)
        assert result.get_output("OUTPUT0")["shape"] == [1, 16]
        assert np.array_equal(shm.get_contents_as_numpy(handles[1], np.float32, [1, 16]), a + b)
        assert np.array_equal(shm.get_contents_as_numpy(handles[1], np.float32, [1, 16],
                                                        offset=size), a - b)
        client.unregister_system_shared_memory("in")
        assert [r["name"] for r in client.get_system_shared_memory_status()] == ["out"]
        client.unregister_system_shared_memory()
        assert client.get_system_shared_memory_status() == []
    finally:
        for handle in handles:
            shm.destroy_shared_memory_region(handle)


# -- plain HTTP -----------------------------------------------------------------------------------


def test_a_json_only_client(server: ServerThread) -> None:
    body = {"id": "plain", "inputs": [
        {"name": "INPUT0", "shape": [2, 16], "datatype": "FP32", "data": [[1.5] * 16] * 2},
        {"name": "INPUT1", "shape": [2, 16], "datatype": "FP32", "data": [0.5] * 32}]}
    status, headers, answer = request(server, "POST", "/v2/models/add_sub/infer",
                                      json.dumps(body).encode())
    assert status == 200 and headers["content-type"] == "application/json"
    document = json.loads(answer)
    assert (document["model_name"], document["model_version"], document["id"]) == \
        ("add_sub", "1", "plain")
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["OUTPUT0"] == {"name": "OUTPUT0", "datatype": "FP32", "shape": [2, 16],
                                  "data": [2.0] * 32}
    assert outputs["OUTPUT1"]["data"] == [1.0] * 32


def error_of(answer: tuple[int, dict[str, str], bytes]) -> tuple[int, str]:
    status, headers, body = answer
    assert headers["content-type"] == "application/json"
    document = json.loads(body)
    assert set(document) == {"error"}
    return status, document["error"]


def test_malformed_requests_get_400_and_a_clear_error(server: ServerThread) -> None:
    infer = "/v2/models/add_sub/infer"
    status, message = error_of(request(server, "POST", infer, b'{"inputs": ['))
    assert status == 400 and "failed to parse the request JSON" in message
    header = b'{"inputs":[{"name":"INPUT0","shape":[1,16],"datatype":"FP32",' \
             b'"parameters":{"binary_data_size":64}}]}'
    for value, expected in (("abc", "Unable to parse Inference-Header-Content-Length"),
                            (str(len(header) + 100), "inference header size")):
        status, message = error_of(request(server, "POST", infer, header + bytes(64),
                                           {"Inference-Header-Content-Length": value}))
        assert status == 400 and expected in message, message
    status, message = error_of(request(server, "POST", infer, header + bytes(10), {
        "Inference-Header-Content-Length": str(len(header))}))
    assert status == 400 and "unexpected size for input 'INPUT0'" in message
    status, message = error_of(request(server, "POST", infer, header + bytes(70), {
        "Inference-Header-Content-Length": str(len(header))}))
    assert status == 400 and "unexpected additional input data" in message
    status, message = error_of(request(server, "POST", infer, json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 16], "datatype": "FP32", "data": [1.0] * 15}]}).encode()))
    assert status == 400 and "'data' holds 15 elements" in message
    status, message = error_of(request(server, "POST", infer, json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 2], "datatype": "INT8", "data": [1.5, 2]}]}).encode()))
    assert status == 400 and "must hold integers" in message
    status, message = error_of(request(server, "POST", infer, b"not gzip",
                                       {"Content-Encoding": "gzip"}))
    assert status == 400 and "gzip" in message
    assert error_of(request(server, "POST", infer, b"{}", {"Content-Encoding": "br"}))[0] == 415
    assert error_of(request(server, "GET", infer)) == (405, "Method Not Allowed")
    assert error_of(request(server, "GET", "/v2/nothing/here")) == (404, "Not Found")
    status, message = error_of(request(server, "POST", infer, bytes(MESSAGE_LIMIT + 1)))
    assert status == 413 and "limit" in message
    count = MESSAGE_LIMIT // 3  # '0,' in JSON, 8 bytes as FP64: a message over the limit
    status, message = error_of(request(server, "POST", "/v2/models/identity_fp64/infer",
                                       b'{"inputs":[{"name":"INPUT0","datatype":"FP64","shape":'
                                       + f"[1,{count}]".encode() + b',"data":['
                                       + b"0," * (count - 1) + b"0]}]}"))
    assert status == 413 and "translates to a message" in message


def test_an_unknown_model_is_404_with_the_grpc_message(
        server: ServerThread, grpc_client: grpcclient.InferenceServerClient) -> None:
    with pytest.raises(InferenceServerException) as over_grpc:
        grpc_client.get_model_metadata("no_such_model")
    status, message = error_of(request(server, "GET", "/v2/models/no_such_model"))
    assert status == 404 and message == over_grpc.value.message()
    body = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1], "datatype": "FP32",
                                   "data": [1.0]}]}).encode()
    status, message = error_of(request(server, "POST", "/v2/models/no_such_model/infer", body))
    assert status == 404


def test_gzip_request_and_pipelined_requests_on_one_connection(server: ServerThread) -> None:
    body = gzip.compress(json.dumps({"inputs": [
        {"name": "INPUT0", "shape": [1, 2], "datatype": "INT8", "data": [3, 4]}]}).encode())
    status, _, answer = request(server, "POST", "/v2/models/identity_int8/infer", body,
                                {"Content-Encoding": "gzip"})
    assert status == 200 and json.loads(answer)["outputs"][0]["data"] == [3, 4]
    status, headers, answer = request(server, "POST", "/v2/models/identity_int8/infer", body, {
        "Content-Encoding": "gzip", "Accept-Encoding": "deflate;q=0.5, gzip"})
    assert headers["content-encoding"] == "gzip"
    assert json.loads(gzip.decompress(answer))["outputs"][0]["data"] == [3, 4]
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"GET /v2/models/add_sub/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /v2/models/nope/ready HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nConnection: close"
                           b"\r\n\r\n")
        received = b""
        while chunk := connection.recv(65536):
            received += chunk
    assert re.findall(rb"HTTP/1\.1 (\d{3}) ", received) == [b"200", b"400", b"200"]


# -- REST and gRPC answer alike -------------------------------------------------------------------


def test_rest_and_grpc_give_the_same_outputs(
        client: httpclient.InferenceServerClient,
        grpc_client: grpcclient.InferenceServerClient) -> None:
    over_grpc = grpc_client.infer("add_sub", add_sub_inputs(grpcclient))
    for binary in (True, False):
        rest = client.infer("add_sub", add_sub_inputs(httpclient, binary), outputs=[
            httpclient.InferRequestedOutput(name, binary_data=binary)
            for name in ("OUTPUT0", "OUTPUT1")])
        for name in ("OUTPUT0", "OUTPUT1"):
            assert rest.as_numpy(name).tobytes() == over_grpc.as_numpy(name).tobytes()
            assert rest.as_numpy(name).dtype == over_grpc.as_numpy(name).dtype


@pytest.mark.parametrize("mistake", ["datatype", "shape", "output", "version"])
def test_rest_and_grpc_refuse_the_same_bad_request_in_the_same_words(
        client: httpclient.InferenceServerClient,
        grpc_client: grpcclient.InferenceServerClient, mistake: str) -> None:
    def ask(module: Any, target: Any) -> InferenceServerException:
        shape = [1, 8] if mistake == "shape" else [1, 16]
        datatype = "INT32" if mistake == "datatype" else "FP32"
        values = np.ones(shape, dtype=np.int32 if mistake == "datatype" else np.float32)
        inputs = [module.InferInput(n, shape, datatype) for n in ("INPUT0", "INPUT1")]
        for tensor in inputs:
            tensor.set_data_from_numpy(values)
        outputs = [module.InferRequestedOutput("NOPE")] if mistake == "output" else None
        with pytest.raises(InferenceServerException) as refused:
            target.infer("add_sub", inputs, outputs=outputs,
                         model_version="9" if mistake == "version" else "")
        return refused.value

    rest, over_grpc = ask(httpclient, client), ask(grpcclient, grpc_client)
    assert rest.message() == over_grpc.message()
    expected = {"StatusCode.INVALID_ARGUMENT": "400", "StatusCode.NOT_FOUND": "404"}
    assert rest.status() == expected[over_grpc.status()]


@pytest.mark.parametrize("path", ["/v2/trace/setting", "/v2/logging",
                                  "/v2/cudasharedmemory/status"])
def test_settings_and_cuda_memory_answer_as_grpc_does(
        server: ServerThread, grpc_client: grpcclient.InferenceServerClient, path: str) -> None:
    call = {"/v2/trace/setting": grpc_client.get_trace_settings,
            "/v2/logging": grpc_client.get_log_settings,
            "/v2/cudasharedmemory/status": grpc_client.get_cuda_shared_memory_status}[path]
    try:
        call(as_json=True)
    except InferenceServerException as refused:
        assert refused.status() == "StatusCode.UNIMPLEMENTED"
        assert error_of(request(server, "GET", path))[0] == 501
    else:
        assert request(server, "GET", path)[0] == 200


def test_cuda_register_body_is_translated(server: ServerThread) -> None:
    handle = base64.b64encode(bytes(64)).decode()
    status, _, _ = request(server, "POST", "/v2/cudasharedmemory/region/r/register",
                           json.dumps({"raw_handle": {"b64": handle}, "device_id": 0,
                                       "byte_size": 16}).encode())
    assert status in (400, 501)
    status, message = error_of(request(server, "POST", "/v2/cudasharedmemory/region/r/register",
                                       json.dumps({"raw_handle": {"b64": "@@"}}).encode()))
    assert status == 400 and "base64" in message


def test_model_paths_are_percent_decoded(server: ServerThread) -> None:
    assert request(server, "GET", "/v2/models/add%5Fsub/ready")[0] == 200
    status, message = error_of(request(server, "GET", "/v2/models/..%2Fetc/config"))
    assert status == 400 and "path separator" in message


def test_the_port_serves_http_only(server: ServerThread, tmp_path: Path) -> None:
    """A TLS client hello on the plain HTTP port is a malformed request, answered and closed."""
    host, port = server.http_url.split(":")
    with socket.create_connection((host, int(port)), timeout=10) as connection:
        connection.sendall(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03" + bytes(32))
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 400")
