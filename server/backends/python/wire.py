"""What passes between the server and a model process: framed JSON messages on a Unix socket,
and tensor bytes in the instance's shared memory.

Shared by both sides (``process.py`` in the server, ``stub.py`` in the model process), so it
imports only the standard library, numpy and ``server.types``. A message is a 4-byte length
and a JSON object (metadata only: names, datatypes, shapes, where each tensor's bytes lie);
tensor bytes never go through the socket and are never pickled.

The shared memory is one memfd the server creates per instance (no name, so nothing in
/dev/shm: the kernel frees it when the last process holding it goes, however that process
ends), cut in two regions of equal size: the server writes a batch's inputs in the first, the
model process its outputs in the second. One batch at a time per instance, so each region is
simply refilled from its start for every batch. A BYTES tensor is laid out as on the wire
(each element a 4-byte little-endian length and its bytes).
"""

from __future__ import annotations

import json
import mmap
import socket
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from server.types import Array, DataType

_LENGTH = struct.Struct("<I")
#: The largest message either side accepts (metadata only: tensors go through memory).
MAX_MESSAGE_BYTES = 16 << 20
#: Every tensor starts on a multiple of this within its region.
ALIGNMENT = 64

#: A tensor's place in a region: [name, datatype (wire name), shape, offset, nbytes].
Descriptor = list[Any]


class ChannelClosed(ConnectionError):
    """The other side closed the socket: the model process (or the server) is gone."""


class RegionFull(ValueError):
    """The tensors do not fit the region (``needed`` bytes, ``capacity`` available)."""

    def __init__(self, needed: int, capacity: int) -> None:
        super().__init__(f"{needed} bytes do not fit the {capacity} bytes of shared memory")
        self.needed = needed
        self.capacity = capacity


def send(sock: socket.socket, message: dict[str, Any]) -> None:
    payload = json.dumps(message, separators=(",", ":")).encode()
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {len(payload)} bytes exceeds {MAX_MESSAGE_BYTES}")
    try:
        sock.sendall(_LENGTH.pack(len(payload)) + payload)
    except (BrokenPipeError, ConnectionResetError) as exc:
        raise ChannelClosed(str(exc)) from None


def receive(sock: socket.socket) -> dict[str, Any]:
    """The next message. Raises ChannelClosed at the end of the stream, TimeoutError when the
    socket's timeout passes, ValueError for a malformed message."""
    (length,) = _LENGTH.unpack(_read(sock, _LENGTH.size))
    if length > MAX_MESSAGE_BYTES:
        raise ValueError(f"message of {length} bytes exceeds {MAX_MESSAGE_BYTES}")
    message = json.loads(_read(sock, length))
    if not isinstance(message, dict):
        raise ValueError("a message must be a JSON object")
    return message


def _read(sock: socket.socket, count: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < count:
        try:
            chunk = sock.recv(count - len(chunks))
        except ConnectionResetError as exc:
            raise ChannelClosed(str(exc)) from None
        if not chunk:
            raise ChannelClosed("the other side closed the channel")
        chunks += chunk
    return bytes(chunks)


def _aligned(offset: int) -> int:
    return (offset + ALIGNMENT - 1) // ALIGNMENT * ALIGNMENT


def byte_items(array: Array) -> list[bytes]:
    """The elements of a BYTES tensor as bytes (str encoded as UTF-8), in C order."""
    items = []
    for item in array.reshape(-1).tolist():
        if isinstance(item, bytes):
            items.append(item)
        elif isinstance(item, str):
            items.append(item.encode())
        else:
            items.append(str(item).encode())
    return items


def tensor_nbytes(array: Array, datatype: DataType) -> int:
    """The bytes ``array`` takes in a region (BYTES: with its length prefixes)."""
    if datatype is DataType.BYTES:
        return sum(_LENGTH.size + len(item) for item in byte_items(array))
    return int(array.size) * datatype.itemsize


class Region:
    """One region of the shared memory, filled from its start for each batch."""

    def __init__(self, memory: mmap.mmap, start: int, size: int) -> None:
        self._memory = memory
        self.start = start
        self.capacity = size
        self._used = 0

    def reset(self) -> None:
        self._used = 0

    def fits(self, sizes: Sequence[int]) -> bool:
        """Whether tensors of ``sizes`` bytes would fit the empty region together."""
        used = 0
        for size in sizes:
            used = _aligned(used) + size
        return used <= self.capacity

    def put(self, name: str, array: Array, datatype: DataType) -> Descriptor:
        """Write ``array`` after what is written already; its descriptor. Raises RegionFull."""
        offset = _aligned(self._used)
        if datatype is DataType.BYTES:
            items = byte_items(array)
            nbytes = sum(_LENGTH.size + len(item) for item in items)
            self._check(offset, nbytes)
            position = self.start + offset
            for item in items:
                _LENGTH.pack_into(self._memory, position, len(item))
                position += _LENGTH.size
                self._memory[position:position + len(item)] = item
                position += len(item)
        else:
            nbytes = int(array.size) * datatype.itemsize
            self._check(offset, nbytes)
            target = np.ndarray(array.shape, dtype=datatype.numpy_dtype, buffer=self._memory,
                                offset=self.start + offset)
            np.copyto(target, array, casting="no" if array.dtype == target.dtype else "unsafe")
            del target
        self._used = offset + nbytes
        return [name, datatype.wire, [int(d) for d in array.shape], offset, nbytes]

    def _check(self, offset: int, nbytes: int) -> None:
        if offset + nbytes > self.capacity:
            raise RegionFull(offset + nbytes, self.capacity)

    def array(self, descriptor: Descriptor) -> Array:
        """The tensor a descriptor places in this region: a view over the memory for fixed-size
        types (valid until the region is refilled), an array of bytes objects for BYTES."""
        _, wire, shape, offset, nbytes = descriptor
        datatype = DataType.from_wire(wire)
        position = self._span(offset, nbytes)
        count = int(np.prod(shape, dtype=np.int64))
        if datatype is DataType.BYTES:
            items = np.empty(count, dtype=object)
            end = position + nbytes
            for i in range(count):
                if position + _LENGTH.size > end:
                    raise ValueError(f"BYTES tensor '{descriptor[0]}' is truncated")
                (length,) = _LENGTH.unpack_from(self._memory, position)
                position += _LENGTH.size
                if position + length > end:
                    raise ValueError(f"BYTES tensor '{descriptor[0]}' is truncated")
                items[i] = self._memory[position:position + length]
                position += length
            return items.reshape(shape)
        if nbytes != count * datatype.itemsize:
            raise ValueError(f"tensor '{descriptor[0]}' of shape {shape} cannot take {nbytes} "
                             "bytes")
        return np.ndarray(shape, dtype=datatype.numpy_dtype, buffer=self._memory, offset=position)

    def copy(self, descriptor: Descriptor) -> bytes:
        """The bytes of a tensor, copied out of the region (its raw wire contents)."""
        _, _, _, offset, nbytes = descriptor
        position = self._span(offset, nbytes)
        return self._memory[position:position + nbytes]

    def _span(self, offset: object, nbytes: object) -> int:
        if not (isinstance(offset, int) and isinstance(nbytes, int)
                and offset >= 0 and nbytes >= 0 and offset + nbytes <= self.capacity):
            raise ValueError(f"a tensor at {offset!r} of {nbytes!r} bytes lies outside the "
                             f"region of {self.capacity} bytes")
        return self.start + offset


def regions(memory: mmap.mmap, size: int) -> tuple[Region, Region]:
    """The inputs region and the outputs region of an instance's shared memory."""
    return Region(memory, 0, size), Region(memory, size, size)
