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


def translate(path: str, body: bytes, headers: dict[str, str] | None = None) -> str:
    """What translation made of the body: the gRPC method of the call it became, or
    ``refused <status>: <message>``; any other exception fails the test."""
    try:
        call = exchange("POST", path, headers or {}, body)
    except BadRequest as refused:
        return f"refused {refused.status}: {refused.message}"
    if call.method == rpc("ModelInfer"):
        # The call's message must be the request it names, one the gRPC side parses.
        return f"{call.method} of {pb.ModelInferRequest.FromString(call.message).model_name}"
    return str(call.method)


def proper(path: str, outcome: str) -> bool:
    """The route's own call (an infer request for model m), or a 4xx with a message."""
    if outcome.startswith("refused "):
        status, _, message = outcome[len("refused "):].partition(": ")
        return 400 <= int(status) < 500 and bool(message)
    if METHODS[path] == "ModelInfer":
        return outcome == f"{rpc('ModelInfer')} of m"
    return outcome == str(rpc(METHODS[path]))


@settings(max_examples=150, deadline=None, derandomize=True)
@given(PATHS, DOCUMENTS, st.binary(max_size=32), st.integers(min_value=-3, max_value=400))
def test_any_json_document_translates_or_is_refused(path: str, document: dict[str, Any],
                                                    tail: bytes, length: int) -> None:
    header = json.dumps(document).encode()
    for body, headers in ((header, {}),
                          (header + tail, {"inference-header-content-length": str(length)}),
                          (header + tail,
                           {"inference-header-content-length": str(len(header))})):
        outcome = translate(path, body, headers)
        assert proper(path, outcome), outcome


@settings(max_examples=100, deadline=None, derandomize=True)
@given(PATHS, st.binary(max_size=64))
def test_any_bytes_translate_or_are_refused(path: str, body: bytes) -> None:
    outcome = translate(path, body)
    assert proper(path, outcome), outcome


def test_the_check_tells_a_wrong_call_or_a_silent_refusal_from_a_proper_answer() -> None:
    """``proper`` itself: a call of another method, an infer call for another model, a 5xx
    and a refusal without a message are all improper."""
    infer = "/v2/models/m/infer"
    assert proper(infer, translate(infer, b"not json"))
    assert not proper(infer, f"{rpc('ModelInfer')} of other")
    assert not proper(infer, str(rpc("RepositoryIndex")))
    assert not proper(infer, "refused 500: broken")
    assert not proper(infer, "refused 400: ")
