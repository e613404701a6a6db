"""Hostile REST bodies: whatever a client sends to a route, translation answers with an
exchange or a BadRequest (a 4xx naming the problem), never another exception."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from server._pb import grpc_service_pb2 as pb
from server.rest.messages import BadRequest
from server.rest.routes import exchange, rpc

SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(allow_nan=True), st.text(max_size=8))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=5), st.dictionaries(st.text(max_size=6), inner, max_size=5)),
    max_leaves=30)
DATATYPES = st.sampled_from(["BOOL", "UINT8", "INT8", "INT16", "INT32", "INT64", "UINT64",
                             "FP16", "FP32", "FP64", "BF16", "BYTES", "FP8", ""])
INPUTS = st.fixed_dictionaries({}, optional={
    "name": st.one_of(st.text(max_size=4), JSON_VALUES),
    "datatype": st.one_of(DATATYPES, JSON_VALUES),
    "shape": st.one_of(st.lists(st.integers(min_value=-2, max_value=6), max_size=3), JSON_VALUES),
    "data": JSON_VALUES,
    "parameters": st.one_of(st.dictionaries(st.sampled_from(
        ["binary_data_size", "shared_memory_region", "x"]), SCALARS, max_size=2), JSON_VALUES),
})
DOCUMENTS = st.fixed_dictionaries({}, optional={
    "id": JSON_VALUES, "parameters": JSON_VALUES,
    "inputs": st.one_of(st.lists(INPUTS, max_size=3), JSON_VALUES),
    "outputs": st.one_of(st.lists(st.fixed_dictionaries({}, optional={
        "name": JSON_VALUES, "parameters": JSON_VALUES}), max_size=2), JSON_VALUES),
})
#: Each route and the gRPC method its requests become.
METHODS = {
    "/v2/models/m/infer": "ModelInfer", "/v2/repository/index": "RepositoryIndex",
    "/v2/repository/models/m/load": "RepositoryModelLoad",
    "/v2/repository/models/m/unload": "RepositoryModelUnload",
    "/v2/systemsharedmemory/region/r/register": "SystemSharedMemoryRegister",
    "/v2/cudasharedmemory/region/r/register": "CudaSharedMemoryRegister",
    "/v2/trace/setting": "TraceSetting", "/v2/logging": "LogSettings",
}
PATHS = st.sampled_from(sorted(METHODS))


def translate(path: str, body: bytes, headers: dict[str, str] | None = None) -> None:
    """The body becomes the route's own gRPC call (an infer request a ModelInferRequest that
    parses), or is refused 4xx with a message; any other exception fails the test."""
    try:
        call = exchange("POST", path, headers or {}, body)
    except BadRequest as refused:
        assert 400 <= refused.status < 500 and refused.message
        return
    assert call.method == rpc(METHODS[path])
    if METHODS[path] == "ModelInfer":
        assert pb.ModelInferRequest.FromString(call.message).model_name == "m"


@settings(max_examples=150, deadline=None, derandomize=True)
@given(PATHS, DOCUMENTS, st.binary(max_size=32), st.integers(min_value=-3, max_value=400))
def test_any_json_document_translates_or_is_refused(path: str, document: dict[str, Any],
                                                    tail: bytes, length: int) -> None:
    header = json.dumps(document).encode()
    translate(path, header)
    translate(path, header + tail, {"inference-header-content-length": str(length)})
    translate(path, header + tail, {"inference-header-content-length": str(len(header))})


@settings(max_examples=100, deadline=None, derandomize=True)
@given(PATHS, st.binary(max_size=64))
def test_any_bytes_translate_or_are_refused(path: str, body: bytes) -> None:
    translate(path, body)
