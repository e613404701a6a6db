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
* Lifetime is reference-counted, as in Triton. A request holds a lease on every region it
  uses from decode to encode. Unregistering a region no request holds removes it at once;
  one that requests hold is marked *pending*: it stays listed (Status shows it, its name
  cannot be registered again, requests may still lease it) and is removed, its descriptor
  closed, when the last lease is returned. So a request never reads through a descriptor
  number that has since been reused for another file.
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


def region_not_found(name: str) -> InvalidInput:
    """A request naming a region its caller has not registered (Triton's wording)."""
    return InvalidInput(f"Unable to find shared memory region: '{name}'")


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

    __slots__ = ("_fd", "_leases", "_owner", "_pending", "byte_size", "key", "name", "offset")

    def __init__(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if byte_size <= 0:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': invalid args (byte_size "
                "must be positive)"
            )
        if offset < 0:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': invalid args (offset "
                "must not be negative)"
            )
        path = object_path(key)
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        except OSError as exc:
            raise InvalidInput(
                f"failed to register shared memory region '{name}': Unable to open shared "
                f"memory region: '{key}' ({exc.strerror or exc})"
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
                    f"failed to register shared memory region '{name}': invalid args (offset "
                    f"{offset} + byte_size {byte_size} exceeds the {info.st_size} bytes of "
                    f"object '{key}')"
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
        #: Who registered it (set by the registry).
        self._owner = ""
        #: Unregistered while leased: removed when the last lease is returned.
        self._pending = False

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
    """Registered regions by owner and name, with leases that keep in-use regions registered.

    ``max_regions`` bounds the regions of one owner, ``max_bytes`` the registered bytes of
    all owners together; a region pending removal still counts against both.
    """

    def __init__(self, max_regions: int, max_bytes: int) -> None:
        self._lock = threading.Lock()
        self._owners: dict[str, dict[str, Region]] = {}
        self._count = 0
        self._bytes = 0
        self.max_regions = max_regions
        self.max_bytes = max_bytes

    def __len__(self) -> int:
        """How many regions are registered over all owners, pending ones included (cheap:
        the request path asks before each infer)."""
        return self._count

    def _admit(self, owner: str, name: str, byte_size: int) -> None:
        """Refuse a registration that would take a name in use (pending removal or not) or
        pass a cap (under the lock)."""
        held = self._owners.get(owner, {})
        region = held.get(name)
        if region is not None:
            pending = (" (unregistered, removed once the requests using it finish)"
                       if region._pending else "")
            raise RegionExists(f"shared memory region '{name}' already in manager{pending}")
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
        region._owner = owner
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
        """Every region of ``owner`` (``name`` empty) or the one named, pending ones included
        (as Triton lists them); NOT_FOUND for a name ``owner`` has not registered."""
        with self._lock:
            held = self._owners.get(owner, {})
            if not name:
                return [r.status() for r in held.values()]
            region = held.get(name)
        if region is None:
            raise RegionNotFound(f"Unable to find system shared memory region: '{name}'")
        return [region.status()]

    def unregister(self, owner: str, name: str = "") -> None:
        """Remove one region of ``owner`` (``name``) or all of them (empty). A name ``owner``
        has not registered is not an error, as in Triton. A region that requests hold is
        marked pending and removed when the last of them returns its lease."""
        with self._lock:
            held = self._owners.get(owner, {})
            if name:
                region = held.get(name)
                chosen = [] if region is None else [region]
            else:
                chosen = list(held.values())
            idle = []
            for region in chosen:
                if region._leases:
                    region._pending = True
                else:
                    idle.append(self._remove(region))
        for region in idle:
            region.close()

    def close(self) -> None:
        """Remove every owner's regions (the server is stopping); leased ones are closed when
        their requests return them."""
        with self._lock:
            dropped = [r for held in self._owners.values() for r in held.values()]
            self._owners.clear()
            self._count = self._bytes = 0
            idle = []
            for region in dropped:
                region._pending = True
                if region._leases == 0:
                    idle.append(region)
        for region in idle:
            region.close()

    def _remove(self, region: Region) -> Region:
        """Take ``region`` out of its owner's regions and the caps' counts (under the lock);
        returns it, for the caller to close once the lock is released."""
        held = self._owners.get(region._owner)
        if held is not None and held.get(region.name) is region:
            del held[region.name]
            if not held:
                del self._owners[region._owner]
            self._count -= 1
            self._bytes -= region.byte_size
        return region

    def acquire(self, owner: str, name: str) -> Region:
        """Lease ``owner``'s region ``name`` for one request; pair with :meth:`release`."""
        with self._lock:
            region = self._owners.get(owner, {}).get(name)
            if region is None:
                raise region_not_found(name)
            region._leases += 1
        return region

    def release(self, region: Region) -> None:
        with self._lock:
            region._leases -= 1
            done = region._pending and region._leases == 0
            if done:
                self._remove(region)
        if done:
            region.close()
