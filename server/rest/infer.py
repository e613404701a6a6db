"""POST .../infer: a JSON (and binary) request as a ModelInferRequest, and the ModelInferResponse
back as JSON (and binary), with Triton's binary tensor extension.

A request body is a JSON header, then, when the ``Inference-Header-Content-Length`` header
gives the header's length, the binary data of the inputs that name a ``binary_data_size``,
one after the other in the order of the inputs. An input carries its data one way: ``data``
(a flat or nested JSON array; BYTES as strings), ``binary_data_size``, or a shared-memory
region (its parameters pass on as they are). Every input not in shared memory becomes a
``raw_input_contents`` entry, so the message is what a gRPC client would send.

The answer's outputs are JSON ``data`` (flat, as Triton writes it) unless binary was asked
for: by the output's ``binary_data`` parameter when the request lists the output, else by the
request's ``binary_data_output`` parameter. Binary outputs follow the JSON header in output
order, each with ``binary_data_size``; the header's length is then sent as
``Inference-Header-Content-Length``. Outputs written to shared memory carry no data.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from server._pb import grpc_service_pb2 as pb
from server.rest.messages import BadRequest, member, parameter_json, set_parameter
from server.types import DataType

HEADER_LENGTH = "inference-header-content-length"
BINARY_DATA_SIZE = "binary_data_size"
BINARY_DATA = "binary_data"
BINARY_DATA_OUTPUT = "binary_data_output"
SHARED_MEMORY_REGION = "shared_memory_region"
_LENGTH = struct.Struct("<I")
#: What JSON element kinds (numpy's kind letters of the parsed array) each target accepts:
#: integers only for integer types (a fraction is refused, not truncated), integers and
#: numbers for floating point types, booleans for BOOL.
_ACCEPTED_KINDS = {"i": "iu", "u": "iu", "f": "iuf", "b": "b"}


@dataclass(slots=True)
class OutputChoices:
    """How the answer's outputs are to be written, from the request."""

    #: The request's binary_data_output: outputs it does not list come back binary.
    binary_default: bool = False
    #: Per listed output: binary or JSON (its binary_data parameter, false by default).
    binary: dict[str, bool] = field(default_factory=dict)
    #: Outputs bound to a shared-memory region (written there, answered without data).
    in_shared_memory: set[str] = field(default_factory=set)

    def wants_binary(self, name: str) -> bool:
        return self.binary.get(name, self.binary_default)


def header_length(value: str | None, body_length: int) -> int | None:
    """The JSON header's length from ``Inference-Header-Content-Length`` (None: the whole
    body is JSON)."""
    if value is None:
        return None
    try:
        length = int(value)
    except ValueError:
        raise BadRequest(f"Unable to parse Inference-Header-Content-Length, got: {value}") \
            from None
    if length == 0:
        raise BadRequest("Inference-Header-Content-Length 0 (the whole body one raw input) "
                         "is not supported: send a JSON header")
    if not 0 < length <= body_length:
        raise BadRequest(f"inference header size should be in range (0, {body_length}], "
                         f"got: {value}")
    return length


def infer_request(model: str, version: str, body: bytes, length: int | None
                  ) -> tuple[pb.ModelInferRequest, OutputChoices]:
    """The ModelInferRequest a REST infer body says, and how to write its answer."""
    header = memoryview(body)[:length] if length is not None else body
    try:
        document = json.loads(bytes(header) if isinstance(header, memoryview) else header)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        where = f": {exc.msg} at line {exc.lineno} column {exc.colno}" \
            if isinstance(exc, json.JSONDecodeError) else f" ({type(exc).__name__})"
        raise BadRequest(f"failed to parse the request JSON buffer{where}") from None
    if not isinstance(document, dict):
        raise BadRequest("the inference request must be a JSON object")
    binary = memoryview(body)[length:] if length is not None else memoryview(b"")
    request = pb.ModelInferRequest(model_name=model, model_version=version)
    request.id = member(document, "id", str, "the request", "")
    choices = OutputChoices()
    parameters = member(document, "parameters", dict, "the request", {})
    for key, value in parameters.items():
        if key == BINARY_DATA_OUTPUT:
            choices.binary_default = member(parameters, key, bool, "the request's parameters")
        else:
            set_parameter(request.parameters[key], key, value)
    at = 0
    for index, entry in enumerate(member(document, "inputs", list, "the request", [])):
        at = _add_input(request, index, entry, binary, at, length is not None)
    if at != len(binary):
        raise BadRequest(f"unexpected additional input data for model '{model}': "
                         f"{len(binary) - at} bytes after the last input's")
    for index, entry in enumerate(member(document, "outputs", list, "the request", [])):
        _add_output(request, index, entry, choices)
    return request, choices


def _add_input(request: pb.ModelInferRequest, index: int, entry: Any, binary: memoryview,
               at: int, has_header_length: bool) -> int:
    """Append input ``entry``; returns where the next input's binary data starts."""
    if not isinstance(entry, dict):
        raise BadRequest(f"input {index} must be a JSON object")
    what = f"input {index}"
    name = member(entry, "name", str, what, "")
    what = f"input '{name}'"
    tensor = request.inputs.add(name=name, datatype=member(entry, "datatype", str, what, ""))
    shape = member(entry, "shape", list, what, [])
    if not all(isinstance(d, int) and not isinstance(d, bool) for d in shape):
        raise BadRequest(f"Unable to parse 'shape' of {what}: expected an array of integers")
    try:
        tensor.shape.extend(shape)
    except ValueError:
        raise BadRequest(f"Unable to parse 'shape' of {what}: a dimension is out of the "
                         "64-bit range") from None
    size: int | None = None
    for key, value in member(entry, "parameters", dict, what, {}).items():
        if key == BINARY_DATA_SIZE:
            size = member(entry["parameters"], key, int, f"the parameters of {what}")
        else:
            set_parameter(tensor.parameters[key], key, value)
    in_shared_memory = SHARED_MEMORY_REGION in tensor.parameters
    given = [kind for kind, present in (("'data'", "data" in entry),
                                        ("'binary_data_size'", size is not None),
                                        ("a shared-memory region", in_shared_memory))
             if present]
    if len(given) > 1:
        raise BadRequest(f"{what} has both {' and '.join(given)}: give its data one way")
    if in_shared_memory:
        return at
    if size is not None:
        if not has_header_length:
            raise BadRequest("must specify valid 'Inference-Header-Content-Length' in request "
                             "header and 'binary_data_size' when passing inputs in binary "
                             "data format")
        if size < 0 or at + size > len(binary):
            raise BadRequest(f"unexpected size for input '{name}', expecting {size} bytes "
                             f"for model '{request.model_name}' and "
                             f"{max(len(binary) - at, 0)} are left in the request")
        request.raw_input_contents.append(bytes(binary[at:at + size]))
        return at + size
    if "data" not in entry:
        raise BadRequest(f"{what} has no 'data', 'binary_data_size' or shared-memory region")
    request.raw_input_contents.append(_json_tensor(name, tensor.datatype, shape, entry["data"]))
    return at


def _json_tensor(name: str, datatype: str, shape: list[int], data: Any) -> bytes:
    """An input's JSON ``data`` as its raw bytes (little-endian, row major; BYTES length
    prefixed). A datatype that is not one gives no bytes: the gRPC handler refuses it, in
    its own words."""
    try:
        kind = DataType.from_wire(datatype)
    except ValueError:
        return b""
    if not isinstance(data, list):
        data = [data]
    count = math.prod(shape) if all(d >= 0 for d in shape) else -1
    if kind is DataType.BYTES:
        items = _flatten(data, name)
        _check_count(name, len(items), count, shape)
        encoded: list[bytes] = []
        for item in items:
            if not isinstance(item, str):
                raise BadRequest(f"input '{name}' is BYTES: its 'data' must hold strings")
            raw = item.encode("utf-8", "surrogateescape")
            encoded += (_LENGTH.pack(len(raw)), raw)
        return b"".join(encoded)
    try:
        parsed = np.asarray(data)
    except ValueError:
        raise BadRequest(f"input '{name}': 'data' is not an array of one shape (rows of "
                         "different lengths)") from None
    _check_count(name, parsed.size, count, shape)
    if kind is DataType.BF16:
        floats = _checked(name, data, parsed, np.dtype(np.float32), datatype)
        return (floats.view(np.uint32) >> 16).astype("<u2").tobytes()
    return _checked(name, data, parsed, kind.numpy_dtype, datatype).tobytes()


def _checked(name: str, data: list[Any], parsed: np.ndarray[Any, Any], target: np.dtype[Any],
             datatype: str) -> np.ndarray[Any, Any]:
    """``parsed`` (numpy's reading of ``data``) as ``target``, refusing elements of the wrong
    kind and integers out of the target's range."""
    accepted = _ACCEPTED_KINDS[target.kind]
    if parsed.size and parsed.dtype.kind not in accepted:
        if target.kind in "iu" and parsed.dtype.kind in "fO":
            # Integers past int64 mixed with others read as float64 (or objects): take the
            # elements themselves, if they are all integers.
            return _wide_integers(name, _flatten(data, name), target, datatype)
        wanted = {"iu": "integers", "iuf": "numbers", "b": "booleans"}[accepted]
        raise BadRequest(f"input '{name}' is {datatype}: its 'data' must hold {wanted}")
    if target.kind in "iu" and parsed.size:
        info = np.iinfo(target)
        if parsed.min() < info.min or parsed.max() > info.max:
            raise _out_of_range(name, datatype, target)
    return parsed.astype(target, copy=False).ravel()


def _wide_integers(name: str, items: list[Any], target: np.dtype[Any],
                   datatype: str) -> np.ndarray[Any, Any]:
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in items):
        raise BadRequest(f"input '{name}' is {datatype}: its 'data' must hold integers")
    try:
        return np.array(items, dtype=target)
    except OverflowError:
        raise _out_of_range(name, datatype, target) from None


def _out_of_range(name: str, datatype: str, target: np.dtype[Any]) -> BadRequest:
    info = np.iinfo(target)
    return BadRequest(f"input '{name}' holds values outside the {datatype} range "
                      f"[{info.min}, {info.max}]")


def _flatten(data: list[Any], name: str, depth: int = 0) -> list[Any]:
    if depth > 64:
        raise BadRequest(f"input '{name}': 'data' is nested too deeply")
    if not any(isinstance(item, list) for item in data):
        return data
    flat: list[Any] = []
    for item in data:
        flat.extend(_flatten(item, name, depth + 1) if isinstance(item, list) else (item,))
    return flat


def _check_count(name: str, found: int, count: int, shape: list[int]) -> None:
    if count >= 0 and found != count:
        raise BadRequest(f"input '{name}': 'data' holds {found} elements; shape {shape} "
                         f"needs {count}")


def _add_output(request: pb.ModelInferRequest, index: int, entry: Any,
                choices: OutputChoices) -> None:
    if not isinstance(entry, dict):
        raise BadRequest(f"output {index} must be a JSON object")
    name = member(entry, "name", str, f"output {index}", "")
    what = f"output '{name}'"
    output = request.outputs.add(name=name)
    choices.binary[name] = False
    for key, value in member(entry, "parameters", dict, what, {}).items():
        if key == BINARY_DATA:
            choices.binary[name] = member(entry["parameters"], key, bool,
                                          f"the parameters of {what}")
        else:
            set_parameter(output.parameters[key], key, value)
    if SHARED_MEMORY_REGION in output.parameters:
        choices.in_shared_memory.add(name)


def infer_response(reply: bytes, choices: OutputChoices) -> tuple[bytes, int | None]:
    """The REST body of a ModelInferResponse, and the JSON header's length when binary
    outputs follow it (None: the body is JSON alone)."""
    response = pb.ModelInferResponse.FromString(reply)
    document: dict[str, Any] = {"model_name": response.model_name,
                                "model_version": response.model_version}
    if response.id:
        document["id"] = response.id
    if response.parameters:
        document["parameters"] = _parameters(response.parameters)
    outputs: list[dict[str, Any]] = []
    binaries: list[bytes] = []
    raw = response.raw_output_contents
    for index, output in enumerate(response.outputs):
        entry: dict[str, Any] = {"name": output.name, "datatype": output.datatype,
                                 "shape": list(output.shape)}
        parameters = _parameters(output.parameters)
        contents = raw[index] if index < len(raw) else b""
        if output.name in choices.in_shared_memory:
            pass
        elif choices.wants_binary(output.name):
            parameters[BINARY_DATA_SIZE] = len(contents)
            binaries.append(contents)
        else:
            entry["data"] = _json_data(output.datatype, contents)
        if parameters:
            entry["parameters"] = parameters
        outputs.append(entry)
    document["outputs"] = outputs
    header = json.dumps(document, separators=(",", ":")).encode()
    if not binaries:
        return header, None
    return b"".join((header, *binaries)), len(header)


def _parameters(parameters: Any) -> dict[str, Any]:
    return {key: parameter_json(value) for key, value in parameters.items()}


def _json_data(datatype: str, contents: bytes) -> list[Any]:
    """An output's raw contents as a flat JSON array."""
    if datatype == "BYTES":
        return [item.decode("utf-8", "backslashreplace") for item in _bytes_items(contents)]
    if datatype == "BF16":
        words = np.frombuffer(contents, dtype="<u2").astype(np.uint32) << 16
        values: list[Any] = words.view(np.float32).tolist()
        return values
    kind = DataType.from_wire(datatype)
    values = np.frombuffer(contents, dtype=kind.numpy_dtype).tolist()
    return values


def _bytes_items(contents: bytes) -> Iterable[bytes]:
    at = 0
    while at + 4 <= len(contents):
        (size,) = _LENGTH.unpack_from(contents, at)
        yield contents[at + 4:at + 4 + size]
        at += 4 + size
