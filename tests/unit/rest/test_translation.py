"""REST <-> V2 protobuf translation: the messages a REST request becomes, and the REST answer a
reply message becomes (server/rest/infer.py, routes.py, messages.py)."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from server._pb import grpc_service_pb2 as pb
from server._pb import model_config_pb2 as mc
from server.rest import infer
from server.rest.messages import BadRequest, to_json
from server.rest.routes import MethodNotAllowed, NotFound, exchange


def build(document: dict[str, object], binary: bytes = b"",
          version: str = "") -> tuple[pb.ModelInferRequest, infer.OutputChoices]:
    header = json.dumps(document).encode()
    return infer.infer_request("m", version, header + binary,
                               len(header) if binary else None)


def test_json_data_nested_or_flat_becomes_raw_contents() -> None:
    request, _ = build({"id": "x", "parameters": {"priority": 1, "flag": True, "w": 0.5,
                                                   "s": "v"},
                        "inputs": [
                            {"name": "a", "shape": [2, 2], "datatype": "FP32",
                             "data": [[1, 2], [3, 4.5]]},
                            {"name": "b", "shape": [3], "datatype": "BYTES",
                             "data": ["x", "\u00e9", ""]},
                            {"name": "c", "shape": [2], "datatype": "FP16", "data": [1.5, -2]},
                            {"name": "d", "shape": [2], "datatype": "UINT64",
                             "data": [0, 2**64 - 1]}]})
    assert (request.model_name, request.id) == ("m", "x")
    assert request.parameters["priority"].int64_param == 1
    assert request.parameters["flag"].bool_param is True
    assert request.parameters["w"].double_param == 0.5
    assert request.parameters["s"].string_param == "v"
    assert [list(t.shape) for t in request.inputs] == [[2, 2], [3], [2], [2]]
    raw = request.raw_input_contents
    assert np.frombuffer(raw[0], "<f4").tolist() == [1, 2, 3, 4.5]
    assert raw[1] == struct.pack("<I", 1) + b"x" + struct.pack("<I", 2) + "\u00e9".encode() \
        + struct.pack("<I", 0)
    assert np.frombuffer(raw[2], "<f2").tolist() == [1.5, -2]
    assert np.frombuffer(raw[3], "<u8").tolist() == [0, 2**64 - 1]


def test_binary_inputs_follow_the_header_in_order() -> None:
    a, b = np.arange(4, dtype="<i4"), np.arange(3, dtype="<f8")
    request, choices = build({"parameters": {"binary_data_output": True}, "inputs": [
        {"name": "a", "shape": [4], "datatype": "INT32",
         "parameters": {"binary_data_size": a.nbytes}},
        {"name": "s", "shape": [4], "datatype": "INT32",
         "parameters": {"shared_memory_region": "r", "shared_memory_byte_size": 16}},
        {"name": "b", "shape": [3], "datatype": "FP64",
         "parameters": {"binary_data_size": b.nbytes}}]}, a.tobytes() + b.tobytes())
    assert list(request.raw_input_contents) == [a.tobytes(), b.tobytes()]
    assert "binary_data_size" not in request.inputs[0].parameters
    assert request.inputs[1].parameters["shared_memory_region"].string_param == "r"
    assert "binary_data_output" not in request.parameters and choices.binary_default


@pytest.mark.parametrize(("document", "binary", "words"), [
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "INT8", "data": [1, 300]}]}, b"",
     "outside the INT8 range"),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "INT8", "data": [1, "2"]}]}, b"",
     "must hold integers"),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "BOOL", "data": [1, 0]}]}, b"",
     "must hold booleans"),
    ({"inputs": [{"name": "a", "shape": [2, 2], "datatype": "FP32", "data": [[1], [2, 3]]}]},
     b"", "rows of different lengths"),
    ({"inputs": [{"name": "a", "shape": [2], "datatype": "BYTES", "data": ["x", 1]}]}, b"",
     "must hold strings"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32", "data": [1],
                  "parameters": {"binary_data_size": 4}}]}, b"abcd", "give its data one way"),
    ({"inputs": [{"name": "a", "shape": [1], "datatype": "FP32"}]}, b"", "has no 'data'"),
    ({"inputs": [{"name": "a", "shape": [1.5], "datatype": "FP32", "data": [1]}]}, b"",
     "array of integers"),
    ({"inputs": "a"}, b"", "Unable to parse 'inputs'"),
    ({"parameters": {"p": [1]}}, b"", "parameter 'p' has invalid type"),
    ({"outputs": [{"name": "o", "parameters": {"binary_data": "yes"}}]}, b"",
     "Unable to parse 'binary_data'"),
])
def test_bad_requests_are_refused_naming_the_problem(document: dict[str, object],
                                                      binary: bytes, words: str) -> None:
    with pytest.raises(BadRequest) as refused:
        build(document, binary)
    assert words in refused.value.message and refused.value.status == 400


def test_an_unknown_datatype_is_left_to_the_grpc_handler() -> None:
    request, _ = build({"inputs": [{"name": "a", "shape": [1], "datatype": "FP8",
                                    "data": [1]}]})
    assert request.inputs[0].datatype == "FP8" and list(request.raw_input_contents) == [b""]


def test_header_length() -> None:
    assert infer.header_length(None, 10) is None
    assert infer.header_length("4", 10) == 4
    for value in ("x", "11", "-1", "0"):
        with pytest.raises(BadRequest):
            infer.header_length(value, 10)


def answer(outputs: list[tuple[str, str, list[int], bytes]], **kwargs: object) -> bytes:
    response = pb.ModelInferResponse(model_name="m", model_version="1", id="r")
    for name, datatype, shape, raw in outputs:
        response.outputs.add(name=name, datatype=datatype, shape=shape)
        response.raw_output_contents.append(raw)
    response.parameters["routing_variant"].string_param = "v1"
    return response.SerializeToString()


def test_outputs_as_json_or_binary_as_asked() -> None:
    floats = np.array([1.5, -2.0], dtype="<f4").tobytes()
    strings = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 1) + b"\xff"
    reply = answer([("f", "FP32", [2], floats), ("s", "BYTES", [2], strings),
                    ("h", "BF16", [1], np.array([0x3FC0], dtype="<u2").tobytes()),
                    ("m", "FP32", [2], b"")])
    choices = infer.OutputChoices(binary_default=False, binary={"f": True},
                                  in_shared_memory={"m"})
    body, length = infer.infer_response(reply, choices)
    assert length is not None and body[length:] == floats
    document = json.loads(body[:length])
    assert document["id"] == "r" and document["parameters"] == {"routing_variant": "v1"}
    outputs = {o["name"]: o for o in document["outputs"]}
    assert outputs["f"]["parameters"] == {"binary_data_size": 8} and "data" not in outputs["f"]
    assert outputs["s"]["data"] == ["ab", "\\xff"]
    assert outputs["h"]["data"] == [1.5]
    assert "data" not in outputs["m"] and outputs["m"]["shape"] == [2]
    body, length = infer.infer_response(answer([("f", "FP32", [2], floats)]),
                                        infer.OutputChoices())
    assert length is None and json.loads(body)["outputs"][0]["data"] == [1.5, -2.0]


def test_routes() -> None:
    assert exchange("GET", "/v2", {}, b"").method.endswith("/ServerMetadata")
    assert exchange("GET", "/v2/models/a%2Fb/versions/3/config", {}, b"").message == \
        pb.ModelConfigRequest(name="a/b", version="3").SerializeToString()
    assert exchange("GET", "/v2/models/stats", {}, b"").message == b""
    load = exchange("POST", "/v2/repository/models/m/load", {},
                    b'{"parameters": {"config": "{}", "file:1/x": "aGk="}}')
    message = pb.RepositoryModelLoadRequest.FromString(load.message)
    assert message.parameters["file:1/x"].bytes_param == b"hi"
    assert message.parameters["config"].string_param == "{}"
    register = exchange("POST", "/v2/systemsharedmemory/region/r/register", {},
                        b'{"key": "/k", "offset": 8, "byte_size": 64}')
    assert pb.SystemSharedMemoryRegisterRequest.FromString(register.message) == \
        pb.SystemSharedMemoryRegisterRequest(name="r", key="/k", offset=8, byte_size=64)
    trace = exchange("POST", "/v2/models/m/trace/setting", {},
                     b'{"trace_level": ["TIMESTAMPS"], "trace_rate": "10", "log_frequency": null}')
    settings = pb.TraceSettingRequest.FromString(trace.message)
    assert settings.model_name == "m" and list(settings.settings["trace_rate"].value) == ["10"]
    assert list(settings.settings["log_frequency"].value) == []
    with pytest.raises(MethodNotAllowed):
        exchange("POST", "/v2/health/live", {}, b"")
    with pytest.raises(NotFound):
        exchange("GET", "/v3", {}, b"")
    with pytest.raises(BadRequest, match="'key'"):
        exchange("POST", "/v2/systemsharedmemory/region/r/register", {}, b'{"byte_size": 1}')


def test_messages_as_triton_writes_its_json() -> None:
    config = mc.ModelConfig(name="m", max_batch_size=4)
    config.input.add(name="x", data_type=mc.TYPE_FP32, dims=[3, 224])
    document = to_json(config)
    assert document["input"][0]["dims"] == [3, 224] and document["max_batch_size"] == 4
    assert document["input"][0]["data_type"] == "TYPE_FP32"
    assert "dynamic_batching" not in document and "reshape" not in document["input"][0]
    stats = pb.ModelStatistics(name="m", inference_count=2**40)
    assert to_json(stats)["inference_count"] == 2**40
