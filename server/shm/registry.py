"""System shared-memory regions registered by clients (Triton's ``system_shared_memory``).

A client on the same host creates a POSIX shared-memory object (``shm_open``; on Linux a file
under ``/dev/shm``), registers a window of it under a name, and then names that region in
inference requests instead of sending tensor bytes over gRPC.

Why it is built this way:

* The object is opened with ``os.open`` + ``mmap`` rather than ``multiprocessing.shared_memory``:
  on Python 3.11 the latter registers the segment with the resource tracker, which would unlink
  the *client's* object when this process exits. We never create, resize or unlink an object.
* Lifetime is reference-counted. A request holds a lease on every region it uses from decode to
  encode; unregistering a region drops its name at once (new requests no longer find it) but the
  mapping is only closed when the last lease is returned, as Triton defers the unmap of a region
  that in-flight requests use. Numpy views handed to backends keep the ``mmap`` object alive on
  their own (a buffer export), so even a view that outlives its lease can never read unmapped
  memory: ``mmap.close`` refuses while exports exist and the mapping goes with the last view.
* Every use re-checks the object's current size (one ``fstat`` through ``mmap.size``): touching a
  mapped page beyond the end of a truncated object raises SIGBUS, which would kill the server.
  A client that truncates the object between that check and the copy can still do that; Triton
  has the same window, and only sealing (memfd, not POSIX shm) would close it.
* All state sits behind one lock, so the registry may be used from the event loop and from
  worker threads alike; no lock is held while a tensor is copied.
"""

from __future__ import annotations

import mmap
import os
import stat
import threading
from dataclasses import dataclass

import grpc

from server.errors import InvalidInput, PeregrineError

#: Where Linux exposes POSIX shared-memory objects; ``shm_open("/k")`` is ``/dev/shm/k``.
SHM_ROOT = "/dev/shm"


class RegionNotFound(PeregrineError):
    """A status request for a region that is not registered (Triton answers NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class RegionExists(PeregrineError):
    """A register request for a name already in use (Triton answers ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


@dataclass(frozen=True, slots=True)
class RegionStatus:
    """What SystemSharedMemoryStatus reports for one region."""

    name: str
    key: str
    offset: int
    byte_size: int


def object_path(key: str) -> str:
    """The file behind shared-memory key ``key``, refusing anything but a plain object name.

    ``shm_open`` accepts one optional leading '/', then a name without '/'. Anything else
    ('..', 'a/b', '/dev/shm/../etc/passwd', NUL bytes) could name a file outside /dev/shm.
    """
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or "\x00" in name or name in (".", ".."):
        raise InvalidInput(
            f"shared memory key '{key}' is not a plain shared-memory object name "
            "(expected '/name' or 'name' with no other '/')"
        )
    return os.path.join(SHM_ROOT, name)


class Region:
    """One registered window ``[offset, offset + byte_size)`` of one shared-memory object."""

    __slots__ = ("_delta", "_leases", "_mmap", "_retired", "byte_size", "key", "name",
                 "offset", "view")

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if byte_size <= 0:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': byte_size must be positive"
            )
        if offset < 0:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': offset must not be negative"
            )
        path = object_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': unable to open shared "
                f"memory object '{key}': {exc.strerror or exc}"
            ) from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise InvalidInput(
                    f"failed to register shared memory region '{name}': '{key}' is not a "
                    "shared memory object"
                )
            if offset + byte_size > info.st_size:
                raise InvalidInput(
                    f"failed to register shared memory region '{name}': offset {offset} + "
                    f"byte_size {byte_size} exceeds the {info.st_size} bytes of object '{key}'"
                )
            # mmap offsets must be page-aligned: map from the page holding `offset`.
            start = offset - offset % mmap.ALLOCATIONGRANULARITY
            try:
                mapped = mmap.mmap(fd, offset - start + byte_size, flags=mmap.MAP_SHARED,
                                   prot=mmap.PROT_READ | mmap.PROT_WRITE, offset=start)
            except (OSError, ValueError) as exc:
                raise InvalidInput(
                    f"failed to register shared memory region '{name}': unable to map "
                    f"object '{key}': {exc}"
                ) from None
        finally:
            os.close(fd)  # mmap keeps its own duplicate of the descriptor
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._mmap: mmap.mmap | None = mapped
        self._delta = offset - start
        #: The whole region, writable; inputs get read-only slices of it.
        self.view: memoryview = memoryview(mapped)[self._delta:self._delta + byte_size]
        self._leases = 0
        self._retired = False

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    def check_backing(self) -> None:
        """Refuse to touch the region if its object has shrunk below it (SIGBUS otherwise)."""
        mapped = self._mmap
        if mapped is None:  # cannot happen under a lease; refuse rather than touch nothing
            raise InvalidInput(f"shared memory region '{self.name}' is not registered")
        try:
            size = mapped.size()
        except (OSError, ValueError) as exc:
            raise InvalidInput(
                f"shared memory region '{self.name}' is no longer usable: {exc}"
            ) from None
        if size < self.offset + self.byte_size:
            raise InvalidInput(
                f"shared memory object '{self.key}' of region '{self.name}' was truncated to "
                f"{size} bytes; the region needs {self.offset + self.byte_size}"
            )

    @property
    def mapped(self) -> bool:
        """Whether the registry still holds the mapping (False once unmapped or handed to the
        views that outlived it)."""
        return self._mmap is not None

    def _unmap(self) -> None:
        """Close the mapping now, or leave it to the last numpy view still exporting it."""
        mapped, view = self._mmap, self.view
        if mapped is None:
            return
        self._mmap, self.view = None, memoryview(b"")
        try:
            view.release()
            mapped.close()
        except BufferError:
            # A view outlived its request (a backend thread finishing, a mirrored or
            # sampled input): the mmap object unmaps itself when that last view goes.
            pass


class SharedMemoryRegistry:
    """Registered regions by name, with leases that keep in-use mappings alive."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._regions: dict[str, Region] = {}

    def __len__(self) -> int:
        """How many regions are registered (cheap: the request path asks before each infer)."""
        return len(self._regions)

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a non-empty name")
        with self._lock:
            if name in self._regions:
                raise RegionExists(f"shared memory region '{name}' already in manager")
        # Open and map outside the lock (a syscall or two), then insert unless raced.
        region = Region(name, key, offset, byte_size)
        with self._lock:
            if name not in self._regions:
                self._regions[name] = region
                return
        region._unmap()
        raise RegionExists(f"shared memory region '{name}' already in manager")

    def status(self, name: str = "") -> list[RegionStatus]:
        """Every region (``name`` empty) or the one named; NOT_FOUND for an unknown name."""
        with self._lock:
            if not name:
                return [r.status() for r in self._regions.values()]
            region = self._regions.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def unregister(self, name: str = "") -> None:
        """Drop one region (``name``) or all (empty). An unknown name is not an error, as in
        Triton. Regions leased by in-flight requests are unmapped when those requests end."""
        with self._lock:
            if name:
                region = self._regions.pop(name, None)
                dropped = [] if region is None else [region]
            else:
                dropped = list(self._regions.values())
                self._regions.clear()
            idle = []
            for region in dropped:
                region._retired = True
                if region._leases == 0:
                    idle.append(region)
        for region in idle:
            region._unmap()

    def acquire(self, name: str) -> Region:
        """Lease the region ``name`` for one request; pair with :meth:`release`."""
        with self._lock:
            region = self._regions.get(name)
            if region is None:
                raise InvalidInput(f"shared memory region '{name}' is not registered")
            region._leases += 1
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            region._leases -= 1
            unmap = region._retired and region._leases == 0
        if unmap:
            region._unmap()
