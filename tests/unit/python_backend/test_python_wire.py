"""server.backends.python.wire: messages on the socket, tensors in the shared memory."""

from __future__ import annotations

import mmap
import socket
import struct

import numpy as np
import pytest

from server.backends.python import wire
from server.types import DataType

SAMPLES = {
    DataType.BOOL: np.array([[True, False], [False, True]]),
    DataType.UINT8: np.array([0, 255], dtype=np.uint8),
    DataType.UINT64: np.array([2**64 - 1], dtype=np.uint64),
    DataType.INT16: np.arange(-3, 3, dtype=np.int16).reshape(2, 3),
    DataType.FP16: np.array([1.5, -0.0, np.inf], dtype=np.float16),
    DataType.FP32: np.arange(12, dtype=np.float32).reshape(3, 4)[:, ::2],  # not contiguous
    DataType.FP64: np.array([np.nan, 1e300]),
    DataType.BF16: np.array([0x3F80, 0x7F80], dtype=np.uint16),
}


@pytest.fixture
def memory() -> mmap.mmap:
    return mmap.mmap(-1, 2 * 4096)


def test_every_fixed_size_type_round_trips_through_a_region(memory: mmap.mmap) -> None:
    inputs, outputs = wire.regions(memory, 4096)
    descriptors = [inputs.put(t.wire, value, t) for t, value in SAMPLES.items()]
    for descriptor, (datatype, value) in zip(descriptors, SAMPLES.items(), strict=True):
        assert descriptor[3] % wire.ALIGNMENT == 0
        got = inputs.array(descriptor)
        assert got.dtype == datatype.numpy_dtype
        np.testing.assert_array_equal(got, value)
        assert inputs.copy(descriptor) == np.ascontiguousarray(value).tobytes()
    outputs.put("o", np.ones(3, np.float32), DataType.FP32)
    np.testing.assert_array_equal(inputs.array(descriptors[0]), SAMPLES[DataType.BOOL])


def test_bytes_are_laid_out_as_on_the_wire(memory: mmap.mmap) -> None:
    region = wire.regions(memory, 4096)[0]
    value = np.array([[b"", "h\u00e9"], [b"a\x00b", 7]], dtype=object)
    descriptor = region.put("text", value, DataType.BYTES)
    raw = region.copy(descriptor)
    assert raw == (struct.pack("<I", 0) + struct.pack("<I", 3) + "h\u00e9".encode()
                   + struct.pack("<I", 3) + b"a\x00b" + struct.pack("<I", 1) + b"7")
    assert descriptor[4] == wire.tensor_nbytes(value, DataType.BYTES) == len(raw)
    assert region.array(descriptor).tolist() == [[b"", "h\u00e9".encode()], [b"a\x00b", b"7"]]


def test_a_region_refuses_what_does_not_fit(memory: mmap.mmap) -> None:
    region = wire.regions(memory, 4096)[1]
    assert region.fits([4050]) and not region.fits([4050, 1])  # the second starts at 4096
    region.put("a", np.zeros(1020, np.float32), DataType.FP32)
    with pytest.raises(wire.RegionFull) as full:
        region.put("b", np.zeros(10, np.float32), DataType.FP32)
    assert full.value.capacity == 4096
    region.reset()
    region.put("b", np.zeros(10, np.float32), DataType.FP32)


@pytest.mark.parametrize("descriptor", [
    ["x", "FP32", [2], 4090, 8],        # past the end
    ["x", "FP32", [2], -8, 8],          # before the start
    ["x", "FP32", [3], 0, 8],           # size and shape disagree
    ["x", "BYTES", [2], 0, 6],          # a length prefix past the tensor
])
def test_descriptors_outside_the_region_are_refused(memory: mmap.mmap,
                                                     descriptor: wire.Descriptor) -> None:
    region = wire.regions(memory, 4096)[0]
    struct.pack_into("<I", memory, 0, 100)
    with pytest.raises(ValueError):
        region.array(descriptor)


def test_messages_are_framed_and_bounded() -> None:
    left, right = socket.socketpair()
    with left, right:
        wire.send(left, {"op": "execute", "requests": [{"id": "r\u00e9"}]})
        assert wire.receive(right) == {"op": "execute", "requests": [{"id": "r\u00e9"}]}
        left.sendall(struct.pack("<I", wire.MAX_MESSAGE_BYTES + 1))
        with pytest.raises(ValueError, match="exceeds"):
            wire.receive(right)
        left.sendall(struct.pack("<I", 2) + b"[]")
        with pytest.raises(ValueError, match="JSON object"):
            wire.receive(right)
        left.close()
        with pytest.raises(wire.ChannelClosed):
            wire.receive(right)
