"""The system shared-memory registry: owners, caps, bounds, keys, leases, deferred closing and
shrunk objects."""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from server.errors import InvalidInput
from server.shm import (
    RegionExists,
    RegionLimit,
    RegionNotFound,
    RegionStatus,
    SharedMemoryRegistry,
)

_names = itertools.count()
MakeObject = Callable[[int], str]
ME, OTHER = "alice", "bob"


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


def registry(max_regions: int = 64, max_bytes: int = 1 << 30) -> SharedMemoryRegistry:
    return SharedMemoryRegistry(max_regions, max_bytes)


def path_of(key: str) -> Path:
    return Path("/dev/shm") / key.lstrip("/")


def descriptors_of(key: str) -> int:
    """How many descriptors this process holds on ``key``'s object."""
    target = str(path_of(key))
    count = 0
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):
            count += os.readlink(f"/proc/self/fd/{fd}") == target
    return count


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_register_status_unregister(make_object: MakeObject) -> None:
    made = registry()
    key = make_object(8192)
    made.register(ME, "a", key, 0, 1024)
    made.register(ME, "b", key.lstrip("/"), 4096, 4096)  # the leading '/' is optional
    assert len(made) == 2
    assert sorted(made.status(ME), key=lambda s: s.name) == [
        RegionStatus("a", key, 0, 1024), RegionStatus("b", key.lstrip("/"), 4096, 4096)]
    assert made.status(ME, "b") == [RegionStatus("b", key.lstrip("/"), 4096, 4096)]
    with pytest.raises(RegionNotFound, match="'zz'"):
        made.status(ME, "zz")
    assert descriptors_of(key) == 2
    made.unregister(ME, "a")
    made.unregister(ME, "a")  # unknown names are not an error
    assert [s.name for s in made.status(ME)] == ["b"]
    made.unregister(ME)
    assert made.status(ME) == [] and len(made) == 0
    assert path_of(key).exists(), "the registry must never unlink the client's object"
    assert descriptors_of(key) == 0


def test_duplicate_and_empty_names(make_object: MakeObject) -> None:
    made = registry()
    key = make_object(64)
    made.register(ME, "a", key, 0, 64)
    with pytest.raises(RegionExists, match="'a' already"):
        made.register(ME, "a", key, 0, 32)
    with pytest.raises(InvalidInput, match="non-empty name"):
        made.register(ME, "", key, 0, 64)
    assert made.status(ME, "a")[0].byte_size == 64
    assert descriptors_of(key) == 1


# -- owners ------------------------------------------------------------------------------------


def test_each_owner_sees_and_uses_only_its_own_regions(make_object: MakeObject) -> None:
    made = registry()
    mine, theirs = make_object(4096), make_object(4096)
    path_of(mine).write_bytes(b"m" * 4096)
    path_of(theirs).write_bytes(b"t" * 4096)
    made.register(ME, "in", mine, 0, 4096)
    made.register(OTHER, "in", theirs, 0, 4096)  # names are per owner
    made.register(OTHER, "secret", theirs, 0, 16)

    assert made.status(ME) == [RegionStatus("in", mine, 0, 4096)]
    assert {s.name for s in made.status(OTHER)} == {"in", "secret"}
    region = made.acquire(ME, "in")
    assert bytes(region.read(0, 4)) == b"mmmm"
    made.release(region)

    # Another owner's region answers exactly as a name nobody registered.
    for name in ("secret", "ghost"):
        with pytest.raises(RegionNotFound) as status_err:
            made.status(ME, name)
        assert status_err.value.message == (
            f"Unable to find system shared memory region: '{name}'")
        with pytest.raises(InvalidInput) as use_err:
            made.acquire(ME, name)
            assert use_err.value.message == f"Unable to find shared memory region: '{name}'"

    made.unregister(ME, "secret")  # not mine: nothing happens
    assert {s.name for s in made.status(OTHER)} == {"in", "secret"}
    made.unregister(ME)  # Unregister(""): every region of mine, none of theirs
    assert made.status(ME) == []
    assert {s.name for s in made.status(OTHER)} == {"in", "secret"}
    assert descriptors_of(mine) == 0 and descriptors_of(theirs) == 2
    made.close()
    assert len(made) == 0 and descriptors_of(theirs) == 0


# -- caps and descriptors ----------------------------------------------------------------------


def test_regions_per_owner_are_capped(make_object: MakeObject) -> None:
    made = registry(max_regions=2)
    key = make_object(4096)
    made.register(ME, "a", key, 0, 16)
    made.register(ME, "b", key, 0, 16)
    before = open_descriptors()
    with pytest.raises(RegionLimit, match="--shm-max-regions") as err:
        made.register(ME, "c", key, 0, 16)
    assert err.value.code.name == "RESOURCE_EXHAUSTED"
    assert open_descriptors() == before
    made.register(OTHER, "c", key, 0, 16)  # the cap is per owner
    made.unregister(ME, "a")
    made.register(ME, "c", key, 0, 16)  # room again
    assert {s.name for s in made.status(ME)} == {"b", "c"}
    made.close()


def test_registered_bytes_are_capped_over_all_owners(make_object: MakeObject) -> None:
    made = registry(max_bytes=1000)
    key = make_object(4096)
    made.register(ME, "a", key, 0, 600)
    before = open_descriptors()
    with pytest.raises(RegionLimit, match="--shm-max-mapped-bytes") as err:
        made.register(OTHER, "b", key, 0, 401)
    assert err.value.code.name == "RESOURCE_EXHAUSTED"
    with pytest.raises(RegionLimit, match="--shm-max-mapped-bytes"):
        made.register(ME, "huge", key, 0, 4096)
    assert open_descriptors() == before
    made.register(OTHER, "b", key, 0, 400)  # exactly at the cap
    made.unregister(ME)
    made.register(OTHER, "c", key, 0, 600)
    assert sum(s.byte_size for s in made.status(OTHER)) == 1000
    made.close()


def test_failed_registrations_leave_no_descriptor(make_object: MakeObject) -> None:
    made = registry()
    key = make_object(4096)
    made.register(ME, "taken", key, 0, 16)
    before = open_descriptors()
    for _ in range(100):
        with pytest.raises(InvalidInput, match="exceeds"):
            made.register(ME, "big", key, 0, 8192)
        with pytest.raises(RegionExists):
            made.register(ME, "taken", key, 0, 16)
    assert open_descriptors() == before
    made.close()


def test_ten_thousand_register_unregister_cycles_keep_descriptors_flat(
    make_object: MakeObject,
) -> None:
    made = registry()
    key = make_object(64)
    before = open_descriptors()
    for index in range(10_000):
        made.register(ME, f"r{index % 3}", key, 0, 64)
        made.unregister(ME, f"r{index % 3}")
    assert open_descriptors() == before
    assert len(made) == 0


# -- keys and bounds ---------------------------------------------------------------------------


@pytest.mark.parametrize("key", ["", "/", "..", "/..", ".", "a/b", "/a/b", "/../../etc/passwd",
                                 "/dev/shm/x", "nul\x00byte"])
def test_keys_must_be_plain_object_names(key: str) -> None:
    with pytest.raises(InvalidInput, match="not a plain"):
        registry().register(ME, "r", key, 0, 16)


def test_symlinks_and_directories_are_refused(tmp_path: Path) -> None:
    made = registry()
    target = tmp_path / "outside"
    target.write_bytes(b"\0" * 4096)
    name = f"peregrine-unit-{os.getpid()}-{next(_names)}"
    link = Path("/dev/shm") / name
    link.symlink_to(target)
    try:
        with pytest.raises(InvalidInput, match="Unable to open shared memory region"):
            made.register(ME, "r", "/" + name, 0, 16)
    finally:
        link.unlink()
    directory = Path("/dev/shm") / f"{name}-dir"
    directory.mkdir()
    try:
        with pytest.raises(InvalidInput,
                           match=r"Unable to open shared memory region|not a shared memory"):
            made.register(ME, "r", directory.name, 0, 16)
    finally:
        directory.rmdir()
    assert len(made) == 0


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
    made = registry()
    with pytest.raises(InvalidInput, match=match):
        made.register(ME, "r", make_object(4096), offset, byte_size)
    assert len(made) == 0


def test_missing_object() -> None:
    with pytest.raises(InvalidInput, match="Unable to open shared memory region: "
                                           "'/peregrine-unit-does-not-exist'"):
        registry().register(ME, "r", "/peregrine-unit-does-not-exist", 0, 16)


def test_unaligned_offset_reads_and_writes_the_right_bytes(make_object: MakeObject) -> None:
    key = make_object(3 * 4096)
    pattern = np.random.default_rng(1).integers(0, 256, 3 * 4096, dtype=np.uint8)
    path_of(key).write_bytes(pattern.tobytes())
    made = registry()
    made.register(ME, "r", key, 5003, 777)
    region = made.acquire(ME, "r")
    try:
        copy = region.read(0, 777)
        assert copy.readonly and bytes(copy) == pattern[5003:5003 + 777].tobytes()
        assert bytes(region.read(700, 77)) == pattern[5703:5780].tobytes()
        region.write(4, memoryview(b"\x01\x02\x03\x04"))
    finally:
        made.release(region)
    assert path_of(key).read_bytes()[5007:5011] == b"\x01\x02\x03\x04"
    made.close()


# -- leases ------------------------------------------------------------------------------------


def test_unregister_waits_for_the_last_lease(make_object: MakeObject) -> None:
    """As in Triton: a region unregistered while leased stays listed, its name taken, until
    the last lease is returned; then it is gone."""
    made = registry()
    key = make_object(4096)
    made.register(ME, "r", key, 0, 4096)
    first, second = made.acquire(ME, "r"), made.acquire(ME, "r")
    assert first is second
    made.unregister(ME, "r")
    assert made.status(ME) == [RegionStatus("r", key, 0, 4096)] and len(made) == 1
    with pytest.raises(RegionExists, match=r"'r' already in manager \(unregistered"):
        made.register(ME, "r", key, 0, 16)
    made.unregister(ME)  # again, and all of them: still waiting
    assert first.open and descriptors_of(key) == 1
    first.write(0, memoryview(b"\x07"))  # still usable by the requests that hold it
    made.release(first)
    assert first.open and len(made) == 1
    made.release(second)
    assert not first.open and descriptors_of(key) == 0
    assert made.status(ME) == [] and len(made) == 0
    with pytest.raises(InvalidInput, match="Unable to find shared memory region: 'r'"):
        made.acquire(ME, "r")
    # A new region may take the name while nothing of the old one is left.
    made.register(ME, "r", key, 0, 16)
    assert made.status(ME, "r")[0].byte_size == 16
    made.close()


def test_close_with_leases(make_object: MakeObject) -> None:
    made = registry()
    key = make_object(4096)
    made.register(ME, "a", key, 0, 100)
    made.register(OTHER, "b", key, 100, 100)
    held = made.acquire(OTHER, "b")
    made.close()
    assert len(made) == 0 and descriptors_of(key) == 1
    made.release(held)
    assert descriptors_of(key) == 0


# -- shrunk objects ----------------------------------------------------------------------------


def test_shrunk_object_fails_reads_and_writes(make_object: MakeObject) -> None:
    """Reading or writing a mapping past a truncated object's end would raise SIGBUS; the
    descriptor reads short instead, and a write checks the size first."""
    made = registry()
    key = make_object(8192)
    made.register(ME, "r", key, 4096, 4096)
    region = made.acquire(ME, "r")
    assert len(region.read(0, 4096)) == 4096
    os.truncate(path_of(key), 4096 + 100)
    with pytest.raises(InvalidInput, match="'r' was truncated to 4196 bytes"):
        region.read(0, 4096)
    assert bytes(region.read(0, 100)) == b"\0" * 100  # what is left is still readable
    with pytest.raises(InvalidInput, match="'r' was truncated to 4196 bytes"):
        region.write(0, memoryview(b"x"))
    assert path_of(key).stat().st_size == 4196, "a refused write must not grow the object"
    made.release(region)
    made.close()


def test_threads_lease_while_others_register(make_object: MakeObject) -> None:
    made = registry()
    key = make_object(4096)
    made.register(ME, "stable", key, 0, 4096)
    errors: list[BaseException] = []
    stop = threading.Event()

    def lease() -> None:
        try:
            for _ in range(2000):
                region = made.acquire(ME, "stable")
                region.read(0, 16)
                made.release(region)
                try:
                    churned = made.acquire(ME, "churn")
                except InvalidInput:
                    continue
                made.release(churned)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    def churn() -> None:
        while not stop.is_set():
            with contextlib.suppress(RegionExists):
                made.register(ME, "churn", key, 0, 64)
            made.unregister(ME, "churn")

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
    made.close()
    assert descriptors_of(key) == 0
