"""InferResponse -> ModelInferResponse, every output as raw_output_contents."""

from __future__ import annotations

import numpy as np

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec import shared_memory
from server.codec.shared_memory import SharedMemoryScope
from server.types import DataType, InferResponse, OutputTensor, ParamValue


def raw_bytes(tensor: OutputTensor) -> bytes:
    if tensor.raw is not None:
        return tensor.raw  # already sliced into bytes by the native unpacker
    data = tensor.data
    if tensor.datatype is DataType.BYTES:
        return _native.encode_bytes(data.reshape(-1))
    if tensor.datatype is DataType.BOOL:
        return np.ascontiguousarray(data, dtype=np.bool_).tobytes()
    return np.ascontiguousarray(data, dtype=tensor.datatype.numpy_dtype).tobytes()


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
        outputs=[
            pb.ModelInferResponse.InferOutputTensor(
                name=t.name, datatype=t.datatype.wire, shape=t.shape
            )
            for t in response.outputs
        ],
        raw_output_contents=raw,
    )
