"""Shared-memory tensors in decode and encode (server.codec.shared_memory), without a server."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server import _native
from server._pb import grpc_service_pb2 as pb
from server.codec import shared_memory
from server.codec.decode import decode_request
from server.codec.encode import encode_response, raw_bytes
from server.codec.parsed import from_parameters
from server.codec.shared_memory import SharedMemoryScope, ShmRef, tensor_reference
from server.codec.wire import NativeWireCodec, ProtobufWireCodec, WireCodec
from server.errors import InvalidInput
from server.shm import SharedMemoryRegistry
from server.types import DataType, InferResponse, OutputTensor

_names = itertools.count()
OWNER = "alice"


@pytest.fixture
def registry() -> Iterator[SharedMemoryRegistry]:
    """A registry with region 'r': 4096 bytes of one object, holding bytes 0..255 repeated."""
    name = f"peregrine-codec-{os.getpid()}-{next(_names)}"
    path = Path("/dev/shm") / name
    path.write_bytes(bytes(range(256)) * 16)
    made = SharedMemoryRegistry(max_regions=4, max_bytes=1 << 20)
    made.register(OWNER, "r", name, 0, 4096)
    yield made
    made.close()
    path.unlink()


def param(**kwargs: Any) -> pb.InferParameter:
    return pb.InferParameter(**kwargs)


def shm_params(region: str = "r", byte_size: int = 16, offset: int | None = None
               ) -> dict[str, pb.InferParameter]:
    params = {"shared_memory_region": param(string_param=region),
              "shared_memory_byte_size": param(int64_param=byte_size)}
    if offset is not None:
        params["shared_memory_offset"] = param(int64_param=offset)
    return params


def test_tensor_reference_parsing() -> None:
    assert tensor_reference("t", {}) is None
    assert tensor_reference("t", from_parameters({"other": param(bool_param=True)})) is None
    assert tensor_reference("t", from_parameters(shm_params())) == ShmRef("r", 0, 16)
    assert tensor_reference("t", from_parameters(shm_params(offset=8))) == ShmRef("r", 8, 16)


@pytest.mark.parametrize(("params", "match"), [
    ({"shared_memory_region": param(string_param="r")}, "must be specified along"),
    ({"shared_memory_offset": param(int64_param=0)}, "without 'shared_memory_region'"),
    ({"shared_memory_byte_size": param(int64_param=4)}, "without 'shared_memory_region'"),
    ({"shared_memory_region": param(int64_param=1),
      "shared_memory_byte_size": param(int64_param=4)}, "expected string_param"),
    ({"shared_memory_region": param(string_param="r"),
      "shared_memory_byte_size": param(string_param="4")}, "expected int64_param"),
    ({"shared_memory_region": param(string_param="r"),
      "shared_memory_byte_size": param(uint64_param=4)}, "expected int64_param"),
    ({"shared_memory_region": param(),
      "shared_memory_byte_size": param(int64_param=4)}, "expected string_param"),
    (shm_params(byte_size=-4), "must not be negative"),
    (shm_params(offset=-1), "must not be negative"),
])
def test_tensor_reference_errors(params: dict[str, pb.InferParameter], match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        tensor_reference("t", from_parameters(params))


def scope_of(registry: SharedMemoryRegistry, owner: str = OWNER) -> SharedMemoryScope:
    return SharedMemoryScope(registry, owner)


def test_input_buffer_is_a_read_only_copy(registry: SharedMemoryRegistry) -> None:
    """And the refusals start with Triton's wording."""
    scope = scope_of(registry)

    def read(dtype: DataType, shape: tuple[int, ...], ref: ShmRef,
             in_scope: SharedMemoryScope | None = scope) -> memoryview:
        return shared_memory.input_buffer(in_scope, "m", "x", dtype, shape, ref)

    buffer = read(DataType.UINT8, (2, 8), ShmRef("r", 300, 16))
    assert buffer.readonly and bytes(buffer) == bytes(range(44, 60))
    with pytest.raises(InvalidInput, match=r"^input byte size mismatch for input 'x' for "
                                           r"model 'm'\. Expected 64, got 16 "):
        read(DataType.FP32, (2, 8), ShmRef("r", 0, 16))
    with pytest.raises(InvalidInput, match=r"^Invalid offset \+ byte size for shared memory "
                                           r"region: 'r' "):
        read(DataType.UINT8, (16,), ShmRef("r", 4090, 16))
    with pytest.raises(InvalidInput, match=r"^Invalid offset for shared memory region: 'r' "):
        read(DataType.UINT8, (16,), ShmRef("r", 4096, 1))
    with pytest.raises(InvalidInput,
                       match=r"^Unable to find shared memory region: 'nope' \(input 'x'\)"):
        read(DataType.UINT8, (16,), ShmRef("nope", 0, 16))
    with pytest.raises(InvalidInput, match=r"^Unable to find shared memory region: 'r'"):
        read(DataType.UINT8, (16,), ShmRef("r", 0, 16), None)
    scope.release()


def test_scope_takes_one_lease_per_region(registry: SharedMemoryRegistry) -> None:
    scope = scope_of(registry)
    region = scope.lease("r")
    assert scope.lease("r") is region
    registry.unregister(OWNER)
    assert region.open
    scope.release()
    assert not region.open
    scope.release()  # idempotent


def test_scope_resolves_names_for_its_owner_only(registry: SharedMemoryRegistry) -> None:
    with pytest.raises(InvalidInput, match=r"region: 'r' \(input 'x'\)"):
        shared_memory.input_buffer(scope_of(registry, "mallory"), "m", "x", DataType.UINT8,
                                   (16,), ShmRef("r", 0, 16))
    with pytest.raises(InvalidInput, match=r"region: 'r' \(output 'y'\)"):
        shared_memory.bind_output(scope_of(registry, "mallory"), "y", ShmRef("r", 0, 16))


def request_with(*tensors: tuple[str, str, list[int], dict[str, pb.InferParameter]],
                 raw: Sequence[bytes] = ()) -> pb.ModelInferRequest:
    message = pb.ModelInferRequest(model_name="m", raw_input_contents=list(raw))
    for name, datatype, shape, params in tensors:
        tensor = message.inputs.add(name=name, datatype=datatype, shape=shape)
        for key, value in params.items():
            tensor.parameters[key].CopyFrom(value)
    return message


def test_decode_mixes_shared_memory_and_raw_inputs(registry: SharedMemoryRegistry) -> None:
    raw = np.arange(4, dtype=np.float32)
    message = request_with(
        ("A", "UINT8", [1, 16], shm_params(byte_size=16, offset=32)),
        ("B", "FP32", [1, 4], {}),
        ("C", "INT32", [1, 4], shm_params(byte_size=16, offset=64)),
        raw=[raw.tobytes()],
    )
    scope = scope_of(registry)
    decoded = decode_request(message, None, scope)
    assert decoded.inputs["A"].tolist() == [list(range(32, 48))]
    assert np.array_equal(decoded.inputs["B"], raw.reshape(1, 4))
    expected_c = np.frombuffer(bytes(range(64, 80)), dtype="<i4").reshape(1, 4)
    assert np.array_equal(decoded.inputs["C"], expected_c)
    assert not decoded.inputs["A"].flags.writeable
    scope.lease("r").write(32, memoryview(b"\x63"))  # a copy: later changes do not reach it
    assert decoded.inputs["A"][0, 0] == 32
    scope.release()


@pytest.mark.parametrize("raw_count", [0, 2])
def test_raw_entries_count_only_inputs_outside_shared_memory(
    registry: SharedMemoryRegistry, raw_count: int
) -> None:
    message = request_with(
        ("A", "UINT8", [1, 16], shm_params()),
        ("B", "UINT8", [1, 4], {}),
        ("C", "UINT8", [1, 4], {}),
        raw=[b"\0" * 4] * raw_count,
    )
    if raw_count == 0:
        match = "carries no data"
    else:
        message.raw_input_contents.append(b"\0" * 4)
        match = "has 3 entries for 2 inputs \\(1 are in shared memory\\)"
    with pytest.raises(InvalidInput, match=match):
        decode_request(message, None, scope_of(registry))


def test_decode_bytes_from_shared_memory(registry: SharedMemoryRegistry) -> None:
    items = [b"", b"abc", "\u00e9".encode()]
    encoded = _native.encode_bytes(items)
    region = registry.acquire(OWNER, "r")
    region.write(100, memoryview(encoded))
    registry.release(region)
    message = request_with(("S", "BYTES", [3], shm_params(byte_size=len(encoded), offset=100)))
    decoded = decode_request(message, None, scope_of(registry))
    assert decoded.inputs["S"].tolist() == items


def test_malformed_bytes_in_shared_memory_never_echo_the_region(
    registry: SharedMemoryRegistry,
) -> None:
    """The native codec's detail derives from the region's length prefixes (one declares
    0x41424344 bytes here); the message names the request's window only."""
    region = registry.acquire(OWNER, "r")
    region.write(100, memoryview(b"\x44\x43\x42\x41secret"))
    registry.release(region)
    with pytest.raises(InvalidInput) as err:
        decode_request(request_with(("S", "BYTES", [1], shm_params(byte_size=10, offset=100))),
                       None, scope_of(registry))
    assert err.value.message == (
        "input 'S' has malformed BYTES content: the 10 bytes at offset 100 of shared memory "
        "region 'r' are not 1 length-prefixed elements")
    with pytest.raises(ValueError, match=str(0x41424344)):  # what the codec itself says
        _native.decode_bytes(b"\x44\x43\x42\x41secret", 1)


def test_encode_writes_shared_memory_outputs(registry: SharedMemoryRegistry) -> None:
    scope = scope_of(registry)
    shared_memory.bind_output(scope, "F", ShmRef("r", 1000, 64))
    shared_memory.bind_output(scope, "S", ShmRef("r", 2000, 64))
    values = np.linspace(0, 1, 8, dtype=np.float64).reshape(2, 4)
    strings = np.array([b"x", b"yz"], dtype=object)
    response = InferResponse("m", "1", "id", [
        OutputTensor("F", DataType.FP32, values),  # cast to the declared type, as raw is
        OutputTensor("R", DataType.INT32, np.arange(3, dtype=np.int32)),
        OutputTensor("S", DataType.BYTES, strings),
    ])
    message = encode_response(response, scope)
    assert [o.name for o in message.outputs] == ["F", "R", "S"]
    assert list(message.outputs[0].shape) == [2, 4]
    assert message.raw_output_contents[0] == b"" == message.raw_output_contents[2]
    assert message.raw_output_contents[1] == raw_bytes(response.outputs[1])
    region = scope.lease("r")
    assert bytes(region.read(1000, 32)) == values.astype(np.float32).tobytes()
    encoded = _native.encode_bytes(strings)
    assert bytes(region.read(2000, len(encoded))) == encoded
    scope.release()


def test_output_larger_than_its_window(registry: SharedMemoryRegistry) -> None:
    scope = scope_of(registry)
    shared_memory.bind_output(scope, "F", ShmRef("r", 0, 12))
    response = InferResponse("m", "1", "", [
        OutputTensor("F", DataType.FP32, np.zeros(4, dtype=np.float32))])
    with pytest.raises(InvalidInput, match=r"output 'F' \(12 bytes\) should be at least 16"):
        encode_response(response, scope)
    with pytest.raises(InvalidInput, match=r"Invalid offset \+ byte size"):
        shared_memory.bind_output(scope, "G", ShmRef("r", 4000, 200))
    scope.release()


def test_without_shared_memory_outputs_encode_is_unchanged() -> None:
    response = InferResponse("m", "1", "", [
        OutputTensor("R", DataType.INT32, np.arange(3, dtype=np.int32))])
    assert encode_response(response) == encode_response(response, None)


@pytest.mark.parametrize("codec", [NativeWireCodec(), ProtobufWireCodec()],
                         ids=["native", "protobuf"])
def test_wire_codecs_read_and_write_shared_memory(
    registry: SharedMemoryRegistry, codec: WireCodec
) -> None:
    raw = np.arange(4, dtype=np.float32)
    message = request_with(
        ("A", "UINT8", [1, 16], shm_params(byte_size=16, offset=32)),
        ("B", "FP32", [1, 4], {}),
        raw=[raw.tobytes()],
    )
    message.outputs.add(name="F").parameters["shared_memory_region"].string_param = "r"
    message.outputs[0].parameters["shared_memory_byte_size"].int64_param = 64
    message.outputs[0].parameters["shared_memory_offset"].int64_param = 1000
    scope = scope_of(registry)
    decoded = codec.decode_request_bytes(message.SerializeToString(), None, scope)
    assert decoded.inputs["A"].tolist() == [list(range(32, 48))]
    assert np.array_equal(decoded.inputs["B"], raw.reshape(1, 4))
    assert decoded.requested_outputs == ("F",) and set(scope.outputs) == {"F"}
    values = np.linspace(0, 1, 8, dtype=np.float32).reshape(2, 4)
    response = InferResponse("m", "1", "id", [
        OutputTensor("F", DataType.FP32, values),
        OutputTensor("R", DataType.INT32, np.arange(3, dtype=np.int32))])
    encoded = codec.encode_response_bytes(response, scope, False)
    assert encoded == encode_response(response, scope).SerializeToString()
    assert bytes(scope.lease("r").read(1000, 32)) == values.tobytes()
    scope.release()
