"""InferResponse -> ModelInferResponse, every output as raw_output_contents.

Two writers of the same bytes: the protobuf runtime (:func:`encode_response` builds the
message, :func:`serialize_response` its bytes: the pure-Python path) and the native encoder
(:func:`encode_response_native`), which copies each output's bytes once, straight from its
array into the message.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec import shared_memory
from server.codec.shared_memory import SharedMemoryScope
from server.types import DataType, InferResponse, OutputTensor, ParamValue

if TYPE_CHECKING:
    from numpy.typing import NDArray

#: The tag of ModelStreamInferResponse.infer_response (field 2, length-delimited).
_STREAM_RESPONSE_TAG = b"\x12"


def raw_buffer(tensor: OutputTensor) -> bytes | NDArray[Any]:
    """The output's raw content: its bytes, or a C-contiguous array holding them (no copy
    when the array already is one of the wire's dtype)."""
    if tensor.raw is not None:
        return tensor.raw  # already sliced into bytes by the native unpacker
    data = tensor.data
    if tensor.datatype is DataType.BYTES:
        return _native.encode_bytes(data.reshape(-1))
    return np.ascontiguousarray(data, dtype=tensor.datatype.numpy_dtype)


def raw_bytes(tensor: OutputTensor) -> bytes:
    raw = raw_buffer(tensor)
    return raw if isinstance(raw, bytes) else raw.tobytes()


def encode_parameter(value: ParamValue) -> pb.InferParameter:
    if isinstance(value, bool):
        return pb.InferParameter(bool_param=value)
    if isinstance(value, int):
        if value > 2**63 - 1:
            return pb.InferParameter(uint64_param=value)
        return pb.InferParameter(int64_param=value)
    if isinstance(value, float):
        return pb.InferParameter(double_param=value)
    return pb.InferParameter(string_param=value)


def _outputs(response: InferResponse) -> list[pb.ModelInferResponse.InferOutputTensor]:
    return [
        pb.ModelInferResponse.InferOutputTensor(name=t.name, datatype=t.datatype.wire,
                                                shape=t.shape)
        for t in response.outputs
    ]


def _raw_contents(response: InferResponse, shm: SharedMemoryScope | None,
                  ) -> list[bytes | NDArray[Any]]:
    """One raw_output_contents entry per output (see shared_memory.raw_output_contents)."""
    if shm is None or not shm.outputs:
        return [raw_buffer(t) for t in response.outputs]
    return shared_memory.raw_output_contents(shm, response.outputs, raw_buffer)


def encode_response(
    response: InferResponse, shm: SharedMemoryScope | None = None
) -> pb.ModelInferResponse:
    """``shm``: the request's shared-memory scope; its outputs are written to their regions
    and get an empty ``raw_output_contents`` entry (one entry per output, as Triton sends)."""
    if shm is None or not shm.outputs:
        raw = [raw_bytes(t) for t in response.outputs]
    else:
        raw = shared_memory.raw_output_contents(shm, response.outputs, raw_bytes)
    return pb.ModelInferResponse(
        model_name=response.model_name,
        model_version=response.model_version,
        id=response.id,
        parameters={k: encode_parameter(v) for k, v in response.parameters.items()},
        outputs=_outputs(response),
        raw_output_contents=raw,
    )


def serialize_response(response: InferResponse, shm: SharedMemoryScope | None,
                       stream: bool) -> bytes:
    """The ModelInferResponse bytes (``stream``: ModelStreamInferResponse bytes) of
    ``response``, serialized by the protobuf runtime.

    The runtime writes map entries in its hash table's order, not the dict's: with more
    than one parameter, the fields before the map, each entry and the fields after it are
    serialized apart and joined (serializations of disjoint fields, concatenated in field
    order, are the serialization of the whole), so that the bytes keep the dict's order,
    as the native encoder does.
    """
    message = encode_response(response, shm)
    inner: bytes
    if len(message.parameters) <= 1:
        inner = message.SerializeToString()
    else:
        head = pb.ModelInferResponse(model_name=message.model_name,
                                     model_version=message.model_version, id=message.id)
        entries = (pb.ModelInferResponse(parameters={key: encode_parameter(value)})
                   for key, value in response.parameters.items())
        tail = pb.ModelInferResponse(outputs=message.outputs,
                                     raw_output_contents=message.raw_output_contents)
        inner = b"".join(m.SerializeToString() for m in (head, *entries, tail))
    if not stream:
        return inner
    return _STREAM_RESPONSE_TAG + _varint(len(inner)) + inner


def _varint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def encode_response_native(response: InferResponse, shm: SharedMemoryScope | None,
                           stream: bool) -> bytes:
    """The bytes :func:`serialize_response` gives, written by the native encoder."""
    raw = _raw_contents(response, shm)
    return _native.encode_infer_response(
        response.model_name, response.model_version, response.id, response.parameters,
        [(t.name, t.datatype.wire, t.shape, r) for t, r in zip(response.outputs, raw,
                                                               strict=True)],
        stream,
    )
