"""System shared memory: client-registered regions that carry tensor data instead of gRPC."""

from server.shm.registry import (
    Region,
    RegionExists,
    RegionNotFound,
    RegionStatus,
    SharedMemoryRegistry,
)

__all__ = ["Region", "RegionExists", "RegionNotFound", "RegionStatus", "SharedMemoryRegistry"]
