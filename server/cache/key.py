"""What identifies a request's answer within one loaded version.

A key is a tuple: the share's owner number, each input's name, datatype and shape, the
requested outputs, the request parameters that may change the answer, the classes asked of
requested outputs (their ``classification`` parameters), and one BLAKE2b digest
(256 bits) of every input's bytes in order. The shapes and datatypes fix where one input's
bytes end and the next begin (a BYTES input is digested in its length-prefixed wire form), so
two requests share a key only when their inputs are equal byte for byte, barring a BLAKE2b
collision. The digest keeps a key small however large the inputs are.

The inputs are the decoded arrays: views over the request's raw bytes, the bytes read from a
client's shared-memory region, or arrays built from typed contents (so the same values sent
raw or typed share a key). Each is C-contiguous by construction (codec.decode).
"""

from __future__ import annotations

from collections.abc import Hashable
from hashlib import blake2b

from server import _native
from server.types import DataType, InferRequest, ParamValue

#: Request parameters that only steer scheduling and never change an answer; every other one
#: is part of the key (the server passes parameters on unread, so a model could read any).
SCHEDULING_PARAMETERS = frozenset({"priority", "timeout"})
DIGEST_BYTES = 32

RequestKey = tuple[object, ...]


def request_key(owner: int, request: InferRequest) -> RequestKey:
    digest = blake2b(digest_size=DIGEST_BYTES)
    types = request.input_types
    tensors = []
    for name, array in request.inputs.items():
        datatype = types[name]
        tensors.append((name, datatype.wire, array.shape))
        if datatype is DataType.BYTES:
            digest.update(_native.encode_bytes(array.reshape(-1)))
        else:
            digest.update(array.data)
    parameters = request.parameters
    classes = request.classification
    return (owner, tuple(tensors), request.requested_outputs,
            _answer_parameters(parameters) if parameters else (),
            tuple(sorted(classes.items())) if classes else (), digest.digest())


def key_inputs(key: Hashable) -> int:
    """How many inputs a key names (what its size depends on beside the digest)."""
    return len(key[1]) if isinstance(key, tuple) else 0


def _answer_parameters(parameters: dict[str, ParamValue]) -> tuple[tuple[str, str, object], ...]:
    """The parameters in the key, sorted, each with its type (True and 1 are equal in Python
    but not on the wire)."""
    return tuple(sorted((key, type(value).__name__, value) for key, value in parameters.items()
                        if key not in SCHEDULING_PARAMETERS))
