"""Tensors that live in registered system shared memory, for decode and encode.

An input or a requested output names a region with three tensor parameters, parsed as Triton
does (``ParseSharedMemoryParams`` in its gRPC frontend): ``shared_memory_region`` (string),
``shared_memory_byte_size`` (int64, required with a region) and ``shared_memory_offset``
(int64, default 0). An input in shared memory takes no ``raw_input_contents`` entry:
raw entries belong, in order, to the inputs that are not in shared memory (Triton's
``InferGRPCToInput`` consumes them the same way, which is what tritonclient sends).

A shared-memory output is written into its region after inference; the response still lists
it (name, datatype, shape) with an *empty* ``raw_output_contents`` entry, because Triton keeps
one raw entry per output so that clients can pair outputs and raw entries by index.

Every region a request touches is leased in one :class:`SharedMemoryScope` for the life of the
request, so an unregister meanwhile cannot close a region the request still reads or writes.
A scope looks regions up for one owner, the caller of the request: another caller's regions
are not registered as far as it can tell.

Inputs are copied out of their region at decode and outputs copied in at encode (the
registry's ``pread``/``pwrite``), so a region the client shrinks fails that request instead of
crashing the server; the figures in error messages are the request's own (names, offsets,
sizes), never bytes read from a region.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import numpy as np

from server import _native
from server.codec.parsed import INT64, STRING, Parameter, Parameters
from server.errors import InvalidInput, byte_size_mismatch
from server.shm.registry import Region, SharedMemoryRegistry, region_not_found
from server.types import DataType, OutputTensor

REGION = "shared_memory_region"
OFFSET = "shared_memory_offset"
BYTE_SIZE = "shared_memory_byte_size"

R = TypeVar("R")


@dataclass(frozen=True, slots=True)
class ShmRef:
    """Where one tensor lives: ``byte_size`` bytes at ``offset`` into region ``region``."""

    region: str
    offset: int
    byte_size: int


def _int_param(tensor: str, key: str, param: Parameter) -> int:
    member, value = param
    if member != INT64 or not isinstance(value, int):
        raise InvalidInput(
            f"invalid value type for '{key}' parameter for tensor '{tensor}', expected "
            "int64_param."
        )
    if value < 0:
        raise InvalidInput(f"'{key}' for tensor '{tensor}' must not be negative, got {value}")
    return value


def tensor_reference(tensor: str, params: Parameters) -> ShmRef | None:
    """The shared-memory reference in a tensor's parameters, or None when it has none."""
    has_region = REGION in params
    if not has_region:
        for key in (OFFSET, BYTE_SIZE):
            if key in params:
                raise InvalidInput(
                    f"'{key}' can not be specified without 'shared_memory_region' parameter "
                    f"for tensor '{tensor}'"
                )
        return None
    member, region = params[REGION]
    if member != STRING or not isinstance(region, str):
        raise InvalidInput(
            f"invalid value type for 'shared_memory_region' parameter for tensor '{tensor}', "
            "expected string_param."
        )
    if BYTE_SIZE not in params:
        raise InvalidInput(
            f"'shared_memory_byte_size' must be specified along with 'shared_memory_region' "
            f"parameter for tensor '{tensor}'"
        )
    offset = _int_param(tensor, OFFSET, params[OFFSET]) if OFFSET in params else 0
    return ShmRef(region, offset, _int_param(tensor, BYTE_SIZE, params[BYTE_SIZE]))


class SharedMemoryScope:
    """The regions one request uses, leased until :meth:`release`, and its output targets.

    Created per request only while some region is registered, so requests on a server that
    nobody uses shared memory with pay nothing. ``owner`` is the request's caller: names
    resolve among its regions only.
    """

    __slots__ = ("_leases", "_owner", "_registry", "outputs")

    def __init__(self, registry: SharedMemoryRegistry, owner: str) -> None:
        self._registry = registry
        self._owner = owner
        self._leases: dict[str, Region] = {}
        #: Requested outputs that go to shared memory, by output name.
        self.outputs: dict[str, tuple[Region, ShmRef]] = {}

    def lease(self, name: str) -> Region:
        region = self._leases.get(name)
        if region is None:
            region = self._leases[name] = self._registry.acquire(self._owner, name)
        return region

    def release(self) -> None:
        leases, self._leases = self._leases, {}
        for region in leases.values():
            self._registry.release(region)


def _window(scope: SharedMemoryScope | None, what: str, ref: ShmRef) -> Region:
    """Lease the region of ``ref`` and check that ``ref`` lies inside it. The messages start
    with Triton's (its shared-memory manager's lookups), then say which tensor and how."""
    if scope is None:
        raise InvalidInput(f"{region_not_found(ref.region)} ({what})")
    try:
        region = scope.lease(ref.region)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc.message} ({what})") from None
    if ref.offset >= region.byte_size:
        raise InvalidInput(
            f"Invalid offset for shared memory region: '{ref.region}' ({what}: offset "
            f"{ref.offset} is not inside its {region.byte_size} bytes)"
        )
    if ref.offset + ref.byte_size > region.byte_size:
        raise InvalidInput(
            f"Invalid offset + byte size for shared memory region: '{ref.region}' ({what}: "
            f"offset {ref.offset} + byte size {ref.byte_size} is past its "
            f"{region.byte_size} bytes)"
        )
    return region


def input_buffer(
    scope: SharedMemoryScope | None,
    model: str,
    name: str,
    datatype: DataType,
    shape: tuple[int, ...],
    ref: ShmRef,
) -> memoryview:
    """A read-only copy of input ``name``'s bytes, read from its region now.

    Decode turns them into a numpy view exactly as it does raw contents. A copy, not a view
    of a mapping: a backend reads its inputs long after decode, when the client may have
    shrunk the object (SIGBUS on a mapping).
    """
    region = _window(scope, f"input '{name}'", ref)
    if datatype is not DataType.BYTES:
        expected = math.prod(shape) * datatype.itemsize
        if ref.byte_size != expected:
            raise byte_size_mismatch(model, name, datatype, shape, expected, ref.byte_size,
                                     "shared_memory_byte_size")
    return region.read(ref.offset, ref.byte_size)


def bind_output(scope: SharedMemoryScope | None, name: str, ref: ShmRef) -> None:
    """Record that output ``name`` is to be written to shared memory (checked now, before
    inference, as Triton does; the size of the result is checked when it is written)."""
    region = _window(scope, f"output '{name}'", ref)
    assert scope is not None
    scope.outputs[name] = (region, ref)


def _write(tensor: OutputTensor, region: Region, ref: ShmRef) -> None:
    data = tensor.data
    encoded: bytes | None = None
    if tensor.datatype is DataType.BYTES:
        encoded = _native.encode_bytes(data.reshape(-1))
        needed = len(encoded)
    else:
        dtype = tensor.datatype.numpy_dtype
        needed = data.size * dtype.itemsize
    if needed > ref.byte_size:
        raise InvalidInput(
            f"shared memory size specified with the request for output '{tensor.name}' "
            f"({ref.byte_size} bytes) should be at least {needed} bytes to hold the results"
        )
    if encoded is None:  # cast to the declared type as raw contents are (no copy if it is)
        region.write(ref.offset, np.ascontiguousarray(data, dtype=dtype).reshape(-1).data)
    else:
        region.write(ref.offset, memoryview(encoded))


def raw_output_contents(
    scope: SharedMemoryScope,
    outputs: Sequence[OutputTensor],
    raw_content: Callable[[OutputTensor], R],
) -> list[R | bytes]:
    """``raw_output_contents`` for ``outputs``: shared-memory outputs are written to their
    regions and answered with an empty entry; the others are encoded by ``raw_content``."""
    targets = scope.outputs
    contents: list[R | bytes] = []
    for tensor in outputs:
        target = targets.get(tensor.name)
        if target is None:
            contents.append(raw_content(tensor))
        else:
            _write(tensor, *target)
            contents.append(b"")
    return contents
