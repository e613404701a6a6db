"""The system shared-memory registry: mapping, bounds, keys, leases and deferred unmapping."""

from __future__ import annotations

import contextlib
import gc
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.errors import InvalidInput
from server.shm import RegionExists, RegionNotFound, RegionStatus, SharedMemoryRegistry

_names = itertools.count()
MakeObject = Callable[[int], str]


@pytest.fixture
def make_object() -> Iterator[MakeObject]:
    """Create POSIX shared-memory objects of a given size; returns their keys ('/name')."""
    made: list[Path] = []

    def make(size: int) -> str:
        name = f"peregrine-unit-{os.getpid()}-{next(_names)}"
        path = Path("/dev/shm") / name
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
        try:
            os.ftruncate(fd, size)
        finally:
            os.close(fd)
        made.append(path)
        return "/" + name

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def path_of(key: str) -> Path:
    return Path("/dev/shm") / key.lstrip("/")


def mappings_of(key: str) -> int:
    gc.collect()
    target = str(path_of(key))
    with open("/proc/self/maps", encoding="utf-8") as maps:
        return sum(1 for line in maps if line.rstrip().endswith(target))


def test_register_status_unregister(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(8192)
    registry.register("a", key, 0, 1024)
    registry.register("b", key.lstrip("/"), 4096, 4096)  # the leading '/' is optional
    assert len(registry) == 2
    assert sorted(registry.status(), key=lambda s: s.name) == [
        RegionStatus("a", key, 0, 1024), RegionStatus("b", key.lstrip("/"), 4096, 4096)]
    assert registry.status("b") == [RegionStatus("b", key.lstrip("/"), 4096, 4096)]
    with pytest.raises(RegionNotFound, match="'zz'"):
        registry.status("zz")
    registry.unregister("a")
    registry.unregister("a")  # unknown names are not an error
    assert [s.name for s in registry.status()] == ["b"]
    registry.unregister()
    assert registry.status() == [] and len(registry) == 0
    assert path_of(key).exists(), "the registry must never unlink the client's object"
    assert mappings_of(key) == 0


def test_duplicate_and_empty_names(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(64)
    registry.register("a", key, 0, 64)
    with pytest.raises(RegionExists, match="'a' already"):
        registry.register("a", key, 0, 32)
    with pytest.raises(InvalidInput, match="non-empty name"):
        registry.register("", key, 0, 64)
    assert registry.status("a")[0].byte_size == 64


@pytest.mark.parametrize("key", ["", "/", "..", "/..", ".", "a/b", "/a/b", "/../../etc/passwd",
                                 "/dev/shm/x", "nul\x00byte"])
def test_keys_must_be_plain_object_names(key: str) -> None:
    with pytest.raises(InvalidInput, match="not a plain"):
        SharedMemoryRegistry().register("r", key, 0, 16)


def test_symlinks_and_directories_are_refused(tmp_path: Path) -> None:
    registry = SharedMemoryRegistry()
    target = tmp_path / "outside"
    target.write_bytes(b"\0" * 4096)
    name = f"peregrine-unit-{os.getpid()}-{next(_names)}"
    link = Path("/dev/shm") / name
    link.symlink_to(target)
    try:
        with pytest.raises(InvalidInput, match="unable to open"):
            registry.register("r", "/" + name, 0, 16)
    finally:
        link.unlink()
    directory = Path("/dev/shm") / f"{name}-dir"
    directory.mkdir()
    try:
        with pytest.raises(InvalidInput, match=r"unable to open|not a shared memory object"):
            registry.register("r", directory.name, 0, 16)
    finally:
        directory.rmdir()
    assert len(registry) == 0


@pytest.mark.parametrize(("offset", "byte_size", "match"), [
    (0, 4097, "exceeds the 4096 bytes"),
    (4096, 1, "exceeds"),
    (4000, 97, "exceeds"),
    (0, 0, "byte_size must be positive"),
    (-1, 16, "offset must not be negative"),
])
def test_region_must_fit_the_object(
    make_object: MakeObject, offset: int, byte_size: int, match: str
) -> None:
    registry = SharedMemoryRegistry()
    with pytest.raises(InvalidInput, match=match):
        registry.register("r", make_object(4096), offset, byte_size)
    assert len(registry) == 0


def test_missing_object() -> None:
    with pytest.raises(InvalidInput, match="unable to open shared memory object"):
        SharedMemoryRegistry().register("r", "/peregrine-unit-does-not-exist", 0, 16)


def test_unaligned_offset_maps_the_right_bytes(make_object: MakeObject) -> None:
    key = make_object(3 * 4096)
    pattern = np.random.default_rng(1).integers(0, 256, 3 * 4096, dtype=np.uint8)
    path_of(key).write_bytes(pattern.tobytes())
    registry = SharedMemoryRegistry()
    registry.register("r", key, 5003, 777)
    region = registry.acquire("r")
    try:
        assert bytes(region.view) == pattern[5003:5003 + 777].tobytes()
        region.view[:4] = b"\x01\x02\x03\x04"  # writes reach the object (MAP_SHARED)
    finally:
        registry.release(region)
    assert path_of(key).read_bytes()[5003:5007] == b"\x01\x02\x03\x04"
    registry.unregister()


def test_unregister_waits_for_the_last_lease(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(4096)
    registry.register("r", key, 0, 4096)
    first, second = registry.acquire("r"), registry.acquire("r")
    assert first is second
    registry.unregister("r")
    assert registry.status() == []
    with pytest.raises(InvalidInput, match="'r' is not registered"):
        registry.acquire("r")
    assert first.mapped and mappings_of(key) == 1
    first.view[0] = 7  # still usable by the requests that hold it
    registry.release(first)
    assert first.mapped
    registry.release(second)
    assert not first.mapped and mappings_of(key) == 0
    # A new region may take the name while nothing of the old one is left.
    registry.register("r", key, 0, 16)
    assert registry.status("r")[0].byte_size == 16


def test_unregister_all_with_leases(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(4096)
    registry.register("a", key, 0, 100)
    registry.register("b", key, 100, 100)
    held = registry.acquire("b")
    registry.unregister()
    assert len(registry) == 0 and mappings_of(key) == 1
    registry.release(held)
    assert mappings_of(key) == 0


def test_a_view_that_outlives_its_lease_keeps_the_memory_valid(make_object: MakeObject) -> None:
    """What a backend thread or a mirrored request may do: the mapping goes with the view."""
    registry = SharedMemoryRegistry()
    key = make_object(4096)
    path_of(key).write_bytes(bytes(range(256)) * 16)
    registry.register("r", key, 0, 4096)
    region = registry.acquire("r")
    view = np.frombuffer(region.view[16:32].toreadonly(), dtype=np.uint8)
    registry.unregister()
    registry.release(region)  # BufferError inside: unmapping is left to the view
    assert not region.mapped
    assert view.tolist() == list(range(16, 32))
    assert mappings_of(key) == 1
    del view
    assert mappings_of(key) == 0


def test_truncated_object_is_detected(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(8192)
    registry.register("r", key, 4096, 4096)
    region = registry.acquire("r")
    region.check_backing()
    os.truncate(path_of(key), 4096 + 100)
    with pytest.raises(InvalidInput, match="truncated to 4196 bytes"):
        region.check_backing()
    registry.release(region)
    registry.unregister()


def test_threads_lease_while_others_register(make_object: MakeObject) -> None:
    registry = SharedMemoryRegistry()
    key = make_object(4096)
    registry.register("stable", key, 0, 4096)
    errors: list[BaseException] = []
    stop = threading.Event()

    def lease() -> None:
        try:
            for _ in range(2000):
                region = registry.acquire("stable")
                region.check_backing()
                registry.release(region)
                try:
                    churned = registry.acquire("churn")
                except InvalidInput:
                    continue
                registry.release(churned)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def churn() -> None:
        while not stop.is_set():
            with contextlib.suppress(RegionExists):
                registry.register("churn", key, 0, 64)
            registry.unregister("churn")

    churner = threading.Thread(target=churn)
    workers = [threading.Thread(target=lease) for _ in range(4)]
    churner.start()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(30)
    stop.set()
    churner.join(10)
    assert not errors
    registry.unregister()
    assert mappings_of(key) == 0
