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

:func:`parsed_key` gives the same key from the parsed form of a request, before any array is
built (a hit then skips decoding and validation): only for requests whose inputs are all raw
contents of fixed-size datatypes, each exactly its shape's length, and whose parameters are all
in the key. Two such requests with one key are then equal in every field that decoding and
validation look at, so a request that finds an answer is the twin of one that was decoded,
validated and answered. Any other request gets None and takes the decoding path.
"""

from __future__ import annotations

import math
from collections.abc import Hashable
from hashlib import blake2b

from server import _native
from server.types import DataType, InferRequest, ParamValue, ParsedRequest

#: Request parameters that only steer scheduling and never change an answer; every other one
#: is part of the key (the server passes parameters on unread, so a model could read any).
SCHEDULING_PARAMETERS = frozenset({"priority", "timeout"})
DIGEST_BYTES = 32

RequestKey = tuple[object, ...]
#: Wire datatype -> element size, for the datatypes whose element size is fixed.
_FIXED_ITEMSIZE = {d.wire: d.itemsize for d in DataType if d is not DataType.BYTES}


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


def parsed_key(owner: int, parsed: ParsedRequest) -> RequestKey | None:
    """:func:`request_key` of the request ``parsed`` decodes to, or None where the parsed form
    alone cannot vouch for it (see the module's docstring)."""
    _model, _version, _id, params, tensors, outputs, raw_contents = parsed
    if len(raw_contents) != len(tensors):
        return None
    digest = blake2b(digest_size=DIGEST_BYTES)
    described = []
    for tensor, data in zip(tensors, raw_contents, strict=True):
        name, wire, dims, tensor_params, contents = tensor
        itemsize = _FIXED_ITEMSIZE.get(wire)
        if (itemsize is None or tensor_params or contents is not None
                or len(data) != math.prod(dims) * itemsize):
            return None
        described.append((name, wire, dims))
        digest.update(data)
    requested = None
    if outputs:
        if any(output_params for _, output_params in outputs):
            return None  # shared-memory outputs, classification
        requested = tuple(name for name, _ in outputs)
    answer: tuple[tuple[str, str, object], ...] = ()
    if params:
        if not SCHEDULING_PARAMETERS.isdisjoint(params) or any(
                value is None for _, value in params.values()):
            return None  # decoding checks these, and they are not in the key
        answer = tuple(sorted((key, type(value).__name__, value)
                              for key, (_, value) in params.items()))
    return (owner, tuple(described), requested, answer, (), digest.digest())


def key_inputs(key: Hashable) -> int:
    """How many inputs a key names (what its size depends on beside the digest)."""
    return len(key[1]) if isinstance(key, tuple) else 0


def _answer_parameters(parameters: dict[str, ParamValue]) -> tuple[tuple[str, str, object], ...]:
    """The parameters in the key, sorted, each with its type (True and 1 are equal in Python
    but not on the wire)."""
    return tuple(sorted((key, type(value).__name__, value) for key, value in parameters.items()
                        if key not in SCHEDULING_PARAMETERS))
