"""The one system shared-memory region fuzzed requests may name (``REGION``), registered with
the server for the run, so that shared_memory_* parameters reach the region's reads and writes
with hostile offsets and sizes (the server must run with ``--allow-client-shm true``)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from multiprocessing import shared_memory

import grpc

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc

REGION = "region0"
SIZE = 256


@contextmanager
def registered_region(channel: grpc.Channel, timeout: float = 10.0) -> Iterator[None]:
    """A ``SIZE``-byte POSIX shared-memory object holding bytes 0..255, registered as
    ``REGION`` while the block runs, then unregistered and removed."""
    memory = shared_memory.SharedMemory(create=True, size=SIZE)
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    try:
        view = memory.buf
        assert view is not None  # None only once closed
        view[:SIZE] = bytes(range(SIZE))
        stub.SystemSharedMemoryRegister(pb.SystemSharedMemoryRegisterRequest(
            name=REGION, key=f"/{memory.name}", offset=0, byte_size=SIZE), timeout=timeout)
        try:
            yield
        finally:
            with suppress(grpc.RpcError):  # a server that died has nothing to unregister
                stub.SystemSharedMemoryUnregister(
                    pb.SystemSharedMemoryUnregisterRequest(name=REGION), timeout=timeout)
    finally:
        memory.close()
        memory.unlink()
