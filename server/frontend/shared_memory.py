"""The shared-memory RPCs of GRPCInferenceService (Triton's ``system_shared_memory`` and
``cuda_shared_memory``).

A mixin of the inference servicer, kept apart so the registry's RPCs stay out of the request
path's module. Each system shared-memory RPC acts on the caller's own regions only (the owner
is the caller's identity).

CUDA shared memory cannot be registered (no CUDA IPC here), but its Status and Unregister
answer as Triton's do with nothing registered: an empty list, and success. Triton's client
code unregisters every region before it registers its own, so programs that use system
shared memory and tidy up CUDA regions too run unchanged.
"""

from __future__ import annotations

import grpc

from server._pb import grpc_service_pb2 as pb
from server.errors import Unsupported
from server.frontend.status import mapped
from server.security.identity import caller
from server.shm import RegionNotFound, RegistrationGate, SharedMemoryRegistry


class SystemSharedMemoryRpcs:
    """Register, Status and Unregister over one :class:`SharedMemoryRegistry`; the gate says
    whether registration is on and from which peers."""

    _shm: SharedMemoryRegistry
    _shm_gate: RegistrationGate

    @mapped
    async def SystemSharedMemoryRegister(
        self, request: pb.SystemSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryRegisterResponse:
        self._shm_gate.check_register(context.peer())
        self._shm.register(
            caller().name, request.name, request.key, request.offset, request.byte_size)
        return pb.SystemSharedMemoryRegisterResponse()

    @mapped
    async def SystemSharedMemoryStatus(
        self, request: pb.SystemSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryStatusResponse:
        region = pb.SystemSharedMemoryStatusResponse.RegionStatus
        return pb.SystemSharedMemoryStatusResponse(regions={
            s.name: region(name=s.name, key=s.key, offset=s.offset, byte_size=s.byte_size)
            for s in self._shm.status(caller().name, request.name)
        })

    @mapped
    async def SystemSharedMemoryUnregister(
        self, request: pb.SystemSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.SystemSharedMemoryUnregisterResponse:
        self._shm_gate.check_enabled()
        self._shm.unregister(caller().name, request.name)
        return pb.SystemSharedMemoryUnregisterResponse()

    @mapped
    async def CudaSharedMemoryRegister(
        self, request: pb.CudaSharedMemoryRegisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryRegisterResponse:
        raise Unsupported(
            f"failed to register CUDA shared memory region '{request.name}': CUDA shared "
            "memory is not supported by this server; register the tensors in system shared "
            "memory instead")

    @mapped
    async def CudaSharedMemoryStatus(
        self, request: pb.CudaSharedMemoryStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryStatusResponse:
        if request.name:
            raise RegionNotFound(f"Unable to find cuda shared memory region: '{request.name}'")
        return pb.CudaSharedMemoryStatusResponse()

    @mapped
    async def CudaSharedMemoryUnregister(
        self, request: pb.CudaSharedMemoryUnregisterRequest, context: grpc.aio.ServicerContext
    ) -> pb.CudaSharedMemoryUnregisterResponse:
        return pb.CudaSharedMemoryUnregisterResponse()  # nothing can be registered
