"""What a running server serves, read through its own RPCs, and one valid request per model."""

from __future__ import annotations

import math
from dataclasses import dataclass

import grpc

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.codec.bytes_reference import encode_bytes
from server.types import DataType


@dataclass(frozen=True)
class Tensor:
    """An input or output as ModelMetadata describes it (-1: any size, the batch dim too)."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Target:
    """One ready model: its versions, tensors and largest batch (0: it does not batch)."""

    name: str
    versions: tuple[str, ...]
    inputs: tuple[Tensor, ...]
    outputs: tuple[Tensor, ...]
    max_batch_size: int


def discover(channel: grpc.Channel, timeout: float = 10.0) -> list[Target]:
    """Every ready model of the server behind ``channel``, by name."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    index = stub.RepositoryIndex(pb.RepositoryIndexRequest(ready=True), timeout=timeout)
    targets = []
    for name in sorted({model.name for model in index.models}):
        meta = stub.ModelMetadata(pb.ModelMetadataRequest(name=name), timeout=timeout)
        config = stub.ModelConfig(pb.ModelConfigRequest(name=name), timeout=timeout).config
        targets.append(Target(
            name=name, versions=tuple(meta.versions),
            inputs=tuple(Tensor(t.name, t.datatype, tuple(t.shape)) for t in meta.inputs),
            outputs=tuple(Tensor(t.name, t.datatype, tuple(t.shape)) for t in meta.outputs),
            max_batch_size=config.max_batch_size))
    return targets


def concrete_shape(tensor: Tensor) -> list[int]:
    """The smallest shape the tensor accepts: one row, and 1 for every other -1, except an
    image's height and width (a preprocessed input is [batch, H, W, C] of UINT8), which get
    the 64 pixels any crop here needs."""
    image = tensor.datatype == "UINT8" and len(tensor.shape) == 4 and tensor.shape[1:3] == (-1, -1)
    return [64 if image and 1 <= k <= 2 else 1 if d == -1 else d
            for k, d in enumerate(tensor.shape)]


def filler(datatype: str, count: int, pattern: bytes) -> bytes:
    """``count`` elements of ``datatype`` as raw contents, made by repeating ``pattern``:
    BOOL bytes are 0 or 1 and BYTES elements are ``pattern`` made ASCII (models with string
    tensors take text), so the content is valid."""
    if datatype == "BYTES":
        return encode_bytes([bytes(b & 0x7F for b in pattern)] * count)
    size = count * DataType.from_wire(datatype).itemsize
    data = (pattern * (size // max(1, len(pattern)) + 1))[:size] if pattern else bytes(size)
    return bytes(b & 1 for b in data) if datatype == "BOOL" else data


def valid_request(target: Target, version: str = "", request_id: str = "") -> bytes:
    """A request the model answers: every input at its smallest shape, fixed contents."""
    request = pb.ModelInferRequest(model_name=target.name, model_version=version, id=request_id)
    for tensor in target.inputs:
        shape = concrete_shape(tensor)
        request.inputs.add(name=tensor.name, datatype=tensor.datatype, shape=shape)
        request.raw_input_contents.append(filler(tensor.datatype, math.prod(shape), b"\x01"))
    return bytes(request.SerializeToString())
