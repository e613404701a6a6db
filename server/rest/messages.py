"""Protobuf messages as JSON values, JSON values as parameters, and gRPC status codes as
HTTP status codes: the conversions every REST route shares."""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from server._pb import grpc_service_pb2 as pb

#: gRPC status -> HTTP status. Triton's mapping for the codes Triton answers (INTERNAL 500,
#: NOT_FOUND 404, UNAVAILABLE 503, UNIMPLEMENTED 501, the rest 400); for the codes Triton
#: never answers, the one the gRPC project gives for each (google.rpc.Code).
HTTP_STATUS = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNKNOWN: 400,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.ALREADY_EXISTS: 400,
    grpc.StatusCode.CANCELLED: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.DATA_LOSS: 500,
}

_INTEGERS = frozenset({
    FieldDescriptor.TYPE_INT32, FieldDescriptor.TYPE_INT64, FieldDescriptor.TYPE_UINT32,
    FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_SINT32, FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED32, FieldDescriptor.TYPE_FIXED64, FieldDescriptor.TYPE_SFIXED32,
    FieldDescriptor.TYPE_SFIXED64})
INT64_MIN, INT64_MAX, UINT64_MAX = -(1 << 63), (1 << 63) - 1, (1 << 64) - 1


class BadRequest(Exception):
    """A request the REST layer cannot translate: answered 400 (or ``status``) with the
    message, before any handler runs."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


def to_json(message: Message) -> dict[str, Any]:
    """Every field of ``message`` by its proto name, defaults included (as Triton writes its
    JSON: the fields without presence always, a message field or a oneof's member when it is
    set), 64-bit integers as JSON numbers, enums by name, maps as objects."""
    out: dict[str, Any] = {}
    for field in message.DESCRIPTOR.fields:
        if field.has_presence and not message.HasField(field.name):
            continue
        out[field.name] = _field_json(field, getattr(message, field.name))
    return out


def _field_json(field: FieldDescriptor, value: Any) -> Any:
    if field.message_type is not None and field.message_type.GetOptions().map_entry:
        value_field = field.message_type.fields_by_name["value"]
        return {str(key): _value_json(value_field, item) for key, item in value.items()}
    if _repeated(field):
        return [_value_json(field, item) for item in value]
    return _value_json(field, value)


def _repeated(field: FieldDescriptor) -> bool:
    """protobuf 5.28+ says so itself; older ones by the label, which 7 removed."""
    repeated = getattr(field, "is_repeated", None)
    if repeated is None:
        return bool(field.label == FieldDescriptor.LABEL_REPEATED)
    return bool(repeated)


def _value_json(field: FieldDescriptor, value: Any) -> Any:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        return to_json(value)
    if field.type == FieldDescriptor.TYPE_ENUM:
        return field.enum_type.values_by_number[value].name \
            if value in field.enum_type.values_by_number else value
    if field.type == FieldDescriptor.TYPE_BYTES:
        return value.decode("utf-8", "backslashreplace")
    if field.type in _INTEGERS:
        return int(value)
    return value


def parameter_json(parameter: pb.InferParameter) -> Any:
    """An InferParameter's value (None when none is set)."""
    kind = parameter.WhichOneof("parameter_choice")
    return None if kind is None else getattr(parameter, kind)


def set_parameter(target: pb.InferParameter, key: str, value: Any) -> None:
    """A JSON value as an InferParameter: a bool, an integer (int64, or uint64 past it), a
    number, or a string."""
    if isinstance(value, bool):
        target.bool_param = value
    elif isinstance(value, int):
        if INT64_MIN <= value <= INT64_MAX:
            target.int64_param = value
        elif INT64_MAX < value <= UINT64_MAX:
            target.uint64_param = value
        else:
            raise BadRequest(f"parameter '{key}' is out of the 64-bit range: {value}")
    elif isinstance(value, float):
        target.double_param = value
    elif isinstance(value, str):
        target.string_param = value
    else:
        raise BadRequest(f"parameter '{key}' has invalid type. It should be either 'int', "
                         "'bool', 'number' or 'string'.")


def parse_json(body: bytes, what: str = "request") -> Any:
    """A request body as JSON; an empty body is an empty object (Triton's defaults)."""
    if not body.strip():
        return {}
    try:
        return json.loads(body)
    except UnicodeDecodeError as exc:
        raise BadRequest(f"failed to parse the {what} JSON buffer: not UTF-8 ({exc.reason} "
                         f"at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise BadRequest(f"failed to parse the {what} JSON buffer: {exc.msg} at line "
                         f"{exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise BadRequest(f"failed to parse the {what} JSON buffer: nested too deeply") \
            from None


def json_object(body: bytes, what: str = "request") -> dict[str, Any]:
    value = parse_json(body, what)
    if not isinstance(value, dict):
        raise BadRequest(f"the {what} body must be a JSON object")
    return value


def member(document: dict[str, Any], key: str, kind: type | tuple[type, ...], what: str,
           default: Any = None) -> Any:
    """``document[key]`` checked to be of ``kind`` (bool is not an int here)."""
    if key not in document:
        return default
    value = document[key]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
        names = " or ".join(_JSON_NAMES.get(k, k.__name__) for k in kinds)
        raise BadRequest(f"Unable to parse '{key}' of {what}: expected {names}")
    return value


_JSON_NAMES = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
               list: "an array", dict: "an object"}


def unsigned(document: dict[str, Any], key: str, what: str, default: int = 0) -> int:
    value: int = member(document, key, int, what, default)
    if not 0 <= value <= UINT64_MAX:
        raise BadRequest(f"Unable to parse '{key}' of {what}: expected an unsigned 64-bit "
                         f"integer, got {value}")
    return value
