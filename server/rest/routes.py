"""The REST surface: each path and HTTP method as the gRPC method it translates to, the
request message built from the path and body, and the reply message written back.

The paths are Triton's (``/v2``, ``/v2/health/{live,ready}``, ``/v2/models/{m}[/versions/{v}]``
with ``/ready``, ``/config``, ``/stats``, ``/infer``, ``/trace/setting``; ``/v2/models/stats``;
``/v2/repository/index``, ``/v2/repository/models/{m}/{load,unload}``;
``/v2/{system,cuda}sharedmemory[/region/{r}]/{status,register,unregister}``;
``/v2/trace/setting``; ``/v2/logging``). Whatever the gRPC method answers, the REST answer
says: a method the server does not offer over gRPC is answered 501 here too.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

from google.protobuf.message import Message

from server._pb import grpc_service_pb2 as pb
from server.rest import infer
from server.rest.messages import (
    BadRequest,
    json_object,
    member,
    to_json,
    unsigned,
)
from server.services import INFERENCE_SERVICE

JSON = "application/json"
BINARY = "application/octet-stream"


@dataclass(slots=True)
class Reply:
    """An HTTP answer: status, body and headers beyond the framing ones."""

    status: int
    body: bytes = b""
    headers: list[tuple[str, str]] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Exchange:
    """One REST request as one gRPC call: the method's path, the request message's bytes,
    and how its reply message becomes the REST answer."""

    method: str
    message: bytes
    answer: Callable[[bytes], Reply]
    #: A compressed answer may be sent (Triton compresses inference answers only).
    compressible: bool = False


def rpc(name: str) -> str:
    return f"/{INFERENCE_SERVICE}/{name}"


def json_reply(value: Any) -> Reply:
    return Reply(200, json.dumps(value, separators=(",", ":")).encode(),
                 [("content-type", JSON)])


def empty_reply(_reply: bytes) -> Reply:
    return Reply(200)


class NotFound(BadRequest):
    def __init__(self) -> None:
        super().__init__("Not Found", 404)


class MethodNotAllowed(BadRequest):
    def __init__(self) -> None:
        super().__init__("Method Not Allowed", 405)


def exchange(method: str, path: str, headers: dict[str, str], body: bytes) -> Exchange:
    """The gRPC call a REST request is; raises NotFound, MethodNotAllowed or BadRequest."""
    parts = [unquote(part) for part in path.split("/")[1:]]
    if parts and parts[-1] == "" and len(parts) > 1:
        parts.pop()  # a trailing slash
    if not parts or parts[0] != "v2":
        raise NotFound
    rest = parts[1:]
    if not rest:
        _allow(method, "GET")
        return _unary("ServerMetadata", pb.ServerMetadataRequest(), pb.ServerMetadataResponse,
                      to_json)
    head = rest[0]
    if head == "health" and len(rest) == 2 and rest[1] in ("live", "ready"):
        _allow(method, "GET")
        return _health(rest[1])
    if head == "models" and len(rest) >= 2:
        return _model_route(method, rest[1:], headers, body)
    if head == "repository":
        return _repository_route(method, rest[1:], body)
    if head in ("systemsharedmemory", "cudasharedmemory"):
        return _shared_memory_route(method, head == "cudasharedmemory", rest[1:], body)
    if rest == ["trace", "setting"]:
        return _trace(method, "", body)
    if rest == ["logging"]:
        return _logging(method, body)
    raise NotFound


def _allow(method: str, *allowed: str) -> None:
    if method not in allowed:
        raise MethodNotAllowed


def _unary(name: str, request: Message, response_type: type[Message],
           render: Callable[[Any], Any]) -> Exchange:
    def answer(reply: bytes) -> Reply:
        return json_reply(render(response_type.FromString(reply)))

    return Exchange(rpc(name), request.SerializeToString(), answer)


def _health(kind: str) -> Exchange:
    """200 when live (ready), else 400, no body (the protocol's health answers)."""
    request: Message = pb.ServerLiveRequest() if kind == "live" else pb.ServerReadyRequest()
    response_type = pb.ServerLiveResponse if kind == "live" else pb.ServerReadyResponse

    def answer(reply: bytes) -> Reply:
        return Reply(200 if getattr(response_type.FromString(reply), kind) else 400)

    return Exchange(rpc("ServerLive" if kind == "live" else "ServerReady"),
                    request.SerializeToString(), answer)


def _model_route(method: str, rest: list[str], headers: dict[str, str],
                 body: bytes) -> Exchange:
    """``rest``: the path after /v2/models/."""
    if rest == ["stats"]:
        _allow(method, "GET")
        return _unary("ModelStatistics", pb.ModelStatisticsRequest(),
                      pb.ModelStatisticsResponse, to_json)
    model, version, action = rest[0], "", rest[1:]
    if len(action) >= 2 and action[0] == "versions":
        version, action = action[1], action[2:]
    if not action:
        _allow(method, "GET")
        return _unary("ModelMetadata", pb.ModelMetadataRequest(name=model, version=version),
                      pb.ModelMetadataResponse, to_json)
    if action == ["infer"]:
        _allow(method, "POST")
        length = infer.header_length(headers.get(infer.HEADER_LENGTH), len(body))
        request, choices = infer.infer_request(model, version, body, length)

        def answer(reply: bytes) -> Reply:
            content, header_length = infer.infer_response(reply, choices)
            if header_length is None:
                return Reply(200, content, [("content-type", JSON)])
            return Reply(200, content, [("content-type", BINARY),
                                        (infer.HEADER_LENGTH, str(header_length))])

        return Exchange(rpc("ModelInfer"), request.SerializeToString(), answer,
                        compressible=True)
    if action == ["ready"]:
        _allow(method, "GET")

        def ready(reply: bytes) -> Reply:
            if pb.ModelReadyResponse.FromString(reply).ready:
                return Reply(200)
            return error_reply(400, "Model version not ready")

        return Exchange(rpc("ModelReady"), pb.ModelReadyRequest(
            name=model, version=version).SerializeToString(), ready)
    if action == ["config"]:
        _allow(method, "GET")
        return _unary("ModelConfig", pb.ModelConfigRequest(name=model, version=version),
                      pb.ModelConfigResponse, lambda response: to_json(response.config))
    if action == ["stats"]:
        _allow(method, "GET")
        return _unary("ModelStatistics", pb.ModelStatisticsRequest(name=model, version=version),
                      pb.ModelStatisticsResponse, to_json)
    if action == ["trace", "setting"] and not version:
        return _trace(method, model, body)
    raise NotFound


def _repository_route(method: str, rest: list[str], body: bytes) -> Exchange:
    """``rest``: the path after /v2/repository/ (a repository's name may come first)."""
    repository = ""
    if rest and rest[0] not in ("index", "models"):
        repository, rest = rest[0], rest[1:]
    if rest == ["index"]:
        _allow(method, "POST")
        document = json_object(body)
        ready = member(document, "ready", bool, "the index request", False)
        return _unary("RepositoryIndex", pb.RepositoryIndexRequest(
            repository_name=repository, ready=ready), pb.RepositoryIndexResponse,
            lambda response: [to_json(entry) for entry in response.models])
    if len(rest) == 3 and rest[0] == "models" and rest[2] in ("load", "unload"):
        _allow(method, "POST")
        model = rest[1]
        parameters = member(json_object(body), "parameters", dict, "the request", {})
        if rest[2] == "load":
            load = pb.RepositoryModelLoadRequest(repository_name=repository, model_name=model)
            for key, value in parameters.items():
                _load_parameter(load.parameters[key], key, value)
            return Exchange(rpc("RepositoryModelLoad"), load.SerializeToString(), empty_reply)
        unload = pb.RepositoryModelUnloadRequest(repository_name=repository, model_name=model)
        for key, value in parameters.items():
            if key == "unload_dependents":
                unload.parameters[key].bool_param = member(
                    parameters, key, bool, "the unload request's parameters")
            else:
                _load_parameter(unload.parameters[key], key, value)
        return Exchange(rpc("RepositoryModelUnload"), unload.SerializeToString(), empty_reply)
    raise NotFound


def _load_parameter(target: pb.ModelRepositoryParameter, key: str, value: Any) -> None:
    """As Triton: ``config`` a string (JSON), ``file:<path>`` base64 content as bytes."""
    if key.startswith("file:"):
        if not isinstance(value, str):
            raise BadRequest(f"Unable to parse '{key}': expected base64 content as a string")
        try:
            target.bytes_param = base64.b64decode(value, validate=True)
        except binascii.Error as exc:
            raise BadRequest(f"Unable to parse '{key}': not base64 ({exc})") from None
    elif isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        target.int64_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise BadRequest(f"Unable to parse '{key}': expected a string, a boolean or an "
                         "integer")


def _shared_memory_route(method: str, cuda: bool, rest: list[str], body: bytes) -> Exchange:
    """``rest``: the path after /v2/{system,cuda}sharedmemory/."""
    region = ""
    if len(rest) == 3 and rest[0] == "region":
        region, rest = rest[1], rest[2:]
    if len(rest) != 1 or rest[0] not in ("status", "register", "unregister"):
        raise NotFound
    action = rest[0]
    kind = "Cuda" if cuda else "System"
    if action == "status":
        _allow(method, "GET")
        status_type: type[Message] = pb.CudaSharedMemoryStatusResponse if cuda \
            else pb.SystemSharedMemoryStatusResponse
        request: Message = pb.CudaSharedMemoryStatusRequest(name=region) if cuda \
            else pb.SystemSharedMemoryStatusRequest(name=region)
        return _unary(f"{kind}SharedMemoryStatus", request, status_type,
                      lambda response: [to_json(r) for r in response.regions.values()])
    _allow(method, "POST")
    if action == "unregister":
        request = pb.CudaSharedMemoryUnregisterRequest(name=region) if cuda \
            else pb.SystemSharedMemoryUnregisterRequest(name=region)
        return Exchange(rpc(f"{kind}SharedMemoryUnregister"), request.SerializeToString(),
                        empty_reply)
    if not region:
        raise BadRequest(f"'region name' is necessary to register {kind.lower()} shared "
                         "memory region")
    document = json_object(body, "register request")
    what = "the register request"
    if cuda:
        handle = member(document, "raw_handle", dict, what, {})
        try:
            raw = base64.b64decode(member(handle, "b64", str, "'raw_handle'", ""),
                                   validate=True)
        except binascii.Error as exc:
            raise BadRequest(f"Unable to parse 'raw_handle': not base64 ({exc})") from None
        request = pb.CudaSharedMemoryRegisterRequest(
            name=region, raw_handle=raw, device_id=member(document, "device_id", int, what, 0),
            byte_size=unsigned(document, "byte_size", what))
    else:
        if "key" not in document:
            raise BadRequest("Shared memory register request has no 'key' field")
        if "byte_size" not in document:
            raise BadRequest("Shared memory register request has no 'byte_size' field")
        request = pb.SystemSharedMemoryRegisterRequest(
            name=region, key=member(document, "key", str, what),
            offset=unsigned(document, "offset", what),
            byte_size=unsigned(document, "byte_size", what))
    return Exchange(rpc(f"{kind}SharedMemoryRegister"), request.SerializeToString(),
                    empty_reply)


def _trace(method: str, model: str, body: bytes) -> Exchange:
    """GET reads the trace settings; POST changes them: a value is a string or a list of
    strings, null clears the setting."""
    _allow(method, "GET", "POST")
    request = pb.TraceSettingRequest(model_name=model)
    if method == "POST":
        for key, value in json_object(body, "trace setting request").items():
            setting = request.settings[key]
            values = value if isinstance(value, list) else [] if value is None else [value]
            if not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                       for v in values):
                raise BadRequest(f"Unable to parse '{key}': expected a string, a list of "
                                 "strings or null")
            setting.value.extend(str(v) for v in values)

    def answer(reply: bytes) -> Reply:
        settings = pb.TraceSettingResponse.FromString(reply).settings
        return json_reply({
            key: list(setting.value) if key == "trace_level" or len(setting.value) != 1
            else setting.value[0] for key, setting in settings.items()})

    return Exchange(rpc("TraceSetting"), request.SerializeToString(), answer)


def _logging(method: str, body: bytes) -> Exchange:
    """GET reads the log settings; POST changes them (booleans, counts or strings)."""
    _allow(method, "GET", "POST")
    request = pb.LogSettingsRequest()
    if method == "POST":
        for key, value in json_object(body, "log setting request").items():
            setting = request.settings[key]
            if isinstance(value, bool):
                setting.bool_param = value
            elif isinstance(value, int) and 0 <= value < 1 << 32:
                setting.uint32_param = value
            elif isinstance(value, str):
                setting.string_param = value
            else:
                raise BadRequest(f"Unable to parse '{key}': expected a boolean, an unsigned "
                                 "32-bit integer or a string")

    def answer(reply: bytes) -> Reply:
        settings = pb.LogSettingsResponse.FromString(reply).settings
        return json_reply({key: getattr(value, value.WhichOneof("parameter_choice") or
                                        "string_param") for key, value in settings.items()})

    return Exchange(rpc("LogSettings"), request.SerializeToString(), answer)


def error_reply(status: int, message: str) -> Reply:
    return json_reply_status(status, {"error": message})


def json_reply_status(status: int, value: Any) -> Reply:
    reply = json_reply(value)
    reply.status = status
    return reply

