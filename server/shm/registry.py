"""System shared-memory regions registered by clients (Triton's ``system_shared_memory``).

A client on the same host creates a POSIX shared-memory object (``shm_open``; on Linux a file
under ``/dev/shm``), registers a window of it under a name, and then names that region in
inference requests instead of sending tensor bytes over gRPC.

Why it is built this way:

* A region belongs to the identity that registered it (its *owner*, passed in by the caller:
  the registry never looks at who is calling). Every lookup is by owner and name, so names
  are per owner, and another owner's region is indistinguishable from one that does not
  exist.
* The object is opened with ``os.open`` and read and written with ``pread``/``pwrite`` on
  that descriptor, never mapped. A client may shrink its object at any time (``ftruncate``);
  touching a mapped page past the new end raises SIGBUS, which would kill the server, and a
  mapping handed to a backend is touched long after any check could run. A short ``pread``
  is an ordinary error instead. Inputs therefore cost one copy (the kernel's), as a copy out
  of a mapping would. ``multiprocessing.shared_memory`` is not used either: on Python 3.11 it
  registers the segment with the resource tracker, which would unlink the *client's* object
  when this process exits. We never create, resize or unlink an object.
* Lifetime is reference-counted. A request holds a lease on every region it uses from decode
  to encode; unregistering a region drops its name at once (new requests no longer find it)
  but its descriptor is only closed when the last lease is returned, so a request never reads
  through a descriptor number that has since been reused for another file.
* Two caps bound what clients can make the server hold: regions per owner and registered
  bytes over all owners (one descriptor per region).
* All state sits behind one lock, so the registry may be used from the event loop and from
  worker threads alike; no lock is held while a tensor is copied.
"""

from __future__ import annotations

import os
import stat
import threading
from dataclasses import dataclass

import grpc
import numpy as np

from server.errors import InvalidInput, PeregrineError

#: Where Linux exposes POSIX shared-memory objects; ``shm_open("/k")`` is ``/dev/shm/k``.
SHM_ROOT = "/dev/shm"


class RegionNotFound(PeregrineError):
    """A status request for a region that is not registered (Triton answers NOT_FOUND)."""

    code = grpc.StatusCode.NOT_FOUND


class RegionExists(PeregrineError):
    """A register request for a name already in use (Triton answers ALREADY_EXISTS)."""

    code = grpc.StatusCode.ALREADY_EXISTS


class RegionLimit(PeregrineError):
    """A register request past --shm-max-regions or --shm-max-mapped-bytes."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED


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
    """One registered window ``[offset, offset + byte_size)`` of one shared-memory object,
    held as an open descriptor (see the module's docstring for why it is not mapped)."""

    __slots__ = ("_fd", "_leases", "_retired", "byte_size", "key", "name", "offset")

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
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self.name = name
        self.key = key
        self.offset = offset
        self.byte_size = byte_size
        self._leases = 0
        self._retired = False

    def status(self) -> RegionStatus:
        return RegionStatus(self.name, self.key, self.offset, self.byte_size)

    @property
    def open(self) -> bool:
        """Whether the region still holds its descriptor (False once closed)."""
        return self._fd >= 0

    def _shrunk(self, size: int) -> InvalidInput:
        return InvalidInput(
            f"shared memory object '{self.key}' of region '{self.name}' was truncated to "
            f"{size} bytes; the region needs {self.offset + self.byte_size}"
        )

    def _failed(self, exc: OSError) -> InvalidInput:
        return InvalidInput(
            f"shared memory region '{self.name}' is not usable: {exc.strerror or exc}"
        )

    def read(self, offset: int, size: int) -> memoryview:
        """A read-only copy of ``size`` bytes at ``offset`` into the region (the caller has
        checked the window against ``byte_size``)."""
        buffer = np.empty(size, dtype=np.uint8).data
        start = self.offset + offset
        done = 0
        try:
            while done < size:  # a read may be short (signals, more than 2 GiB at once)
                got = os.preadv(self._fd, [buffer[done:]], start + done)
                if got == 0:
                    raise self._shrunk(start + done)
                done += got
        except OSError as exc:
            raise self._failed(exc) from None
        return buffer.toreadonly()

    def write(self, offset: int, data: memoryview) -> None:
        """Write ``data`` (C-contiguous) at ``offset`` into the region.

        A shrunk object is refused (one ``fstat``) rather than silently grown back; a client
        that shrinks it after that check gets it grown back to the window's end by ``pwrite``,
        which is harmless to the server."""
        start = self.offset + offset
        flat = data.cast("B")
        done, size = 0, flat.nbytes
        try:
            current = os.fstat(self._fd).st_size
            if current < self.offset + self.byte_size:
                raise self._shrunk(current)
            while done < size:
                done += os.pwrite(self._fd, flat[done:], start + done)
        except OSError as exc:
            raise self._failed(exc) from None

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)


class SharedMemoryRegistry:
    """Registered regions by owner and name, with leases that keep in-use regions open.

    ``max_regions`` bounds the regions of one owner, ``max_bytes`` the registered bytes of
    all owners together.
    """

    def __init__(self, max_regions: int, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, dict[str, Region]] = {}
        self._count = 0
        self._bytes = 0
        self.max_regions = max_regions
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        """How many regions are registered over all owners (cheap: the request path asks
        before each infer)."""
        return self._count

    def _admit(self, owner: str, name: str, byte_size: int) -> None:
        """Refuse a registration that would take a name in use or pass a cap (under the
        lock)."""
        held = self._owners.get(owner, {})
        if name in held:
            raise RegionExists(f"shared memory region '{name}' already in manager")
        if len(held) >= self.max_regions:
            raise RegionLimit(
                f"failed to register shared memory region '{name}': the caller already holds "
                f"{len(held)} regions, the most --shm-max-regions allows"
            )
        if self._bytes + byte_size > self.max_bytes:
            raise RegionLimit(
                f"failed to register shared memory region '{name}': {byte_size} more bytes "
                f"would pass --shm-max-mapped-bytes ({self.max_bytes} bytes over all callers, "
                f"{self._bytes} registered)"
            )

    def register(self, owner: str, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a non-empty name")
        with self._lock:
            self._admit(owner, name, byte_size)
        # Open the object outside the lock (a syscall or two), then admit again: another
        # registration may have taken the name or the room meanwhile.
        region = Region(name, key, offset, byte_size)
        try:
            with self._lock:
                self._admit(owner, name, byte_size)
                self._owners.setdefault(owner, {})[name] = region
                self._count += 1
                self._bytes += byte_size
        except BaseException:
            region.close()
            raise

    def status(self, owner: str, name: str = "") -> list[RegionStatus]:
        """Every region of ``owner`` (``name`` empty) or the one named; NOT_FOUND for a name
        ``owner`` has not registered."""
        with self._lock:
            held = self._owners.get(owner, {})
            if not name:
                return [r.status() for r in held.values()]
            region = held.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def unregister(self, owner: str, name: str = "") -> None:
        """Drop one region of ``owner`` (``name``) or all of them (empty). A name ``owner``
        has not registered is not an error, as in Triton. Regions leased by in-flight
        requests are closed when those requests end."""
        with self._lock:
            held = self._owners.get(owner, {})
            if name:
                region = held.pop(name, None)
                dropped = [] if region is None else [region]
            else:
                dropped = list(held.values())
                held.clear()
            if not held:
                self._owners.pop(owner, None)
            idle = self._retire(dropped)
        for region in idle:
            region.close()

    def close(self) -> None:
        """Drop every owner's regions (the server is stopping)."""
        with self._lock:
            dropped = [r for held in self._owners.values() for r in held.values()]
            self._owners.clear()
            idle = self._retire(dropped)
        for region in idle:
            region.close()

    def _retire(self, dropped: list[Region]) -> list[Region]:
        """Account for unregistered regions (under the lock); returns those no request
        holds, to close now."""
        idle = []
        for region in dropped:
            region._retired = True
            self._count -= 1
            self._bytes -= region.byte_size
            if region._leases == 0:
                idle.append(region)
        return idle

    def acquire(self, owner: str, name: str) -> Region:
        """Lease ``owner``'s region ``name`` for one request; pair with :meth:`release`."""
        with self._lock:
            region = self._owners.get(owner, {}).get(name)
            if region is None:
                raise InvalidInput(f"shared memory region '{name}' is not registered")
            region._leases += 1
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            region._leases -= 1
            close = region._retired and region._leases == 0
        if close:
            region.close()
