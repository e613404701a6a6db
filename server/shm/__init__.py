"""System shared memory: client-registered regions that carry tensor data instead of gRPC."""

from server.shm.access import RegistrationGate, RemotePeer, SharedMemoryDisabled, is_local_peer
from server.shm.registry import (
    Region,
    RegionExists,
    RegionLimit,
    RegionNotFound,
    RegionStatus,
    SharedMemoryRegistry,
)

__all__ = [
    "Region",
    "RegionExists",
    "RegionLimit",
    "RegionNotFound",
    "RegionStatus",
    "RegistrationGate",
    "RemotePeer",
    "SharedMemoryDisabled",
    "SharedMemoryRegistry",
    "is_local_peer",
]
