"""Caps on one request, checked on the parsed form before anything is built from it.

Shapes and declared sizes are in the parsed form (``codec.parsed``), so a request that would
decode into too many elements, too many bytes or too many BYTES objects is refused before
one numpy array or Python object exists, and before its model is looked up: a flood of tiny
BYTES elements costs the server a parse, never millions of objects. The same pass gives the
request's decoded size, which the admission bound on queued bytes (``server.admission``)
counts. Negative dims, unknown datatypes and missing contents are left to the decoder, which
names them.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec.parsed import ParsedRequest
from server.codec.shared_memory import BYTE_SIZE, REGION
from server.errors import BoundExceeded
from server.types import DataType

#: Element size by wire datatype name; BYTES is absent (its size is its payload).
_ITEMSIZE = {dt.wire: dt.itemsize for dt in DataType if dt is not DataType.BYTES}
_BYTES = DataType.BYTES.wire


@dataclass(frozen=True, slots=True)
class RequestCaps:
    """What one request may decode into: the flags --max-tensor-elements,
    --max-request-bytes and --max-bytes-elements (the settings resolve their defaults)."""

    max_tensor_elements: int
    max_request_bytes: int
    max_bytes_elements: int


#: For tools that decode without a server's settings (benchmarks, tests): no cap.
NO_CAPS = RequestCaps(sys.maxsize, sys.maxsize, sys.maxsize)


#: Entries one request may hold in all (csrc/wire_codec.hpp, kMaxRequestEntries).
MAX_REQUEST_ENTRIES = _native.MAX_REQUEST_ENTRIES
TOO_MANY_ENTRIES = (
    f"the request holds more than {MAX_REQUEST_ENTRIES} entries (inputs, outputs, raw "
    f"contents, parameters, shape dims); the server takes at most {MAX_REQUEST_ENTRIES}")


def too_many_entries() -> BoundExceeded:
    return BoundExceeded("max_request_entries", TOO_MANY_ENTRIES)


def check_entries(message: pb.ModelInferRequest) -> None:
    """The native parser's entry bound on a message the protobuf runtime parsed: the same
    count, except that a parameter key sent several times counts once here (the runtime
    keeps the last)."""
    entries = (len(message.inputs) + len(message.outputs) + len(message.raw_input_contents)
               + len(message.parameters))
    for tensor in message.inputs:
        entries += len(tensor.shape) + len(tensor.parameters) + tensor.HasField("contents")
    for output in message.outputs:
        entries += len(output.parameters)
    if entries > MAX_REQUEST_ENTRIES:
        raise too_many_entries()


def decoded_bytes(parsed: ParsedRequest, caps: RequestCaps) -> int:
    """The bytes ``parsed``'s inputs decode into (a fixed-size tensor's elements times their
    size; a BYTES tensor's payload as sent: its raw entry, typed contents or shared-memory
    window); raises BoundExceeded past a cap."""
    tensors = parsed[4]
    raw_contents = parsed[6]
    total = 0
    bytes_elements = 0
    raw_index = 0
    for name, wire_type, dims, params, contents in tensors:
        count = math.prod(dims)
        if count > caps.max_tensor_elements or count < 0:
            if min(dims) < 0:
                count = 0  # a negative dim: the decoder refuses it
            else:
                raise BoundExceeded(
                    "max_tensor_elements",
                    f"input '{name}' has {count} elements (shape {list(dims)}); the server "
                    f"takes at most {caps.max_tensor_elements} per tensor "
                    "(--max-tensor-elements)")
        in_shm = bool(params) and REGION in params
        if wire_type == _BYTES:
            bytes_elements += count
            if bytes_elements > caps.max_bytes_elements:
                raise BoundExceeded(
                    "max_bytes_elements",
                    f"the request has {bytes_elements} BYTES elements; the server takes at "
                    f"most {caps.max_bytes_elements} per request (--max-bytes-elements)")
            if in_shm:
                size = params[BYTE_SIZE][1] if BYTE_SIZE in params else 0
                total += size if isinstance(size, int) else 0
            elif raw_index < len(raw_contents):
                total += len(raw_contents[raw_index])
            elif isinstance(contents, pb.InferTensorContents):
                total += contents.ByteSize()
            elif contents is not None:
                total += len(contents)
        else:
            total += count * _ITEMSIZE.get(wire_type, 0)
        if not in_shm and raw_contents:
            raw_index += 1
    if total > caps.max_request_bytes:
        raise BoundExceeded(
            "max_request_bytes",
            f"the request's inputs decode into {total} bytes; the server takes at most "
            f"{caps.max_request_bytes} per request (--max-request-bytes)")
    return total
