"""The request arena (csrc/arena.hpp through server._native): where blocks go, against a
Python model of the same first-fit allocator; what a block holds while the engine views it;
when it is freed; what the engine refuses to take; and the trimmed tail."""

from __future__ import annotations

import gc
import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import _native

HEADER = 64
ALIGN = 64
MIB = 1 << 20


@pytest.fixture
def memfd() -> Iterator[int]:
    fd = os.memfd_create("test-arena", os.MFD_CLOEXEC)
    yield fd
    os.close(fd)


def pair(fd: int, size: int) -> tuple[_native.ArenaWriter, _native.ArenaReader]:
    os.ftruncate(fd, size)
    return _native.ArenaWriter(fd, size), _native.ArenaReader(fd, size)


class FirstFit:
    """The oracle: address-ordered first fit over merged free ranges, the blocks freed by
    the engine taken back before each placement."""

    def __init__(self, size: int) -> None:
        self.usable = size // ALIGN * ALIGN
        self.free = {0: self.usable}
        self.live: dict[int, int] = {}
        self.freed: set[int] = set()

    def place(self, length: int) -> int:
        if length == 0 or length > self.usable - HEADER:
            return -1
        for block in sorted(self.freed):
            self.free[block] = self.live.pop(block)
        self.freed.clear()
        merged: dict[int, int] = {}
        for start in sorted(self.free):
            last = max(merged, default=None)
            if last is not None and last + merged[last] == start:
                merged[last] += self.free[start]
            else:
                merged[start] = self.free[start]
        self.free = merged
        need = -(-(HEADER + length) // ALIGN) * ALIGN
        for start in sorted(self.free):
            if self.free[start] >= need:
                rest = self.free.pop(start) - need
                if rest:
                    self.free[start + need] = rest
                self.live[start] = need
                return start + HEADER
        return -1


operations = st.lists(st.one_of(
    st.tuples(st.just("place"), st.integers(1, 300_000)),
    st.tuples(st.just("drop"), st.integers(0, 1000))), max_size=60)


@given(operations)
@settings(max_examples=150, deadline=None)
def test_blocks_go_where_first_fit_puts_them_and_keep_their_bytes(
        ops: list[tuple[str, int]]) -> None:
    fd = os.memfd_create("test-arena", os.MFD_CLOEXEC)
    try:
        writer, reader = pair(fd, MIB)
    finally:
        os.close(fd)
    oracle = FirstFit(MIB)
    held: list[tuple[int, memoryview, bytes]] = []
    for n, (op, value) in enumerate(ops):
        if op == "place":
            message = bytes([n % 251]) * value
            offset = writer.place(message)
            assert offset == oracle.place(value)
            if offset >= 0:
                held.append((offset, memoryview(reader.take(offset, value)), message))
        elif held:
            offset, view, _ = held.pop(value % len(held))
            view.release()
            oracle.freed.add(offset - HEADER)
        for _, view, message in held:  # no placement overwrote a block still viewed
            assert view == message


def test_a_taken_message_is_the_placed_bytes_read_only(memfd: int) -> None:
    writer, reader = pair(memfd, MIB)
    message = np.arange(10_000, dtype=np.float32).tobytes()
    offset = writer.place(message)
    assert offset >= HEADER and offset % ALIGN == 0
    view = memoryview(reader.take(offset, len(message)))
    assert view.readonly and bytes(view) == message
    with pytest.raises(TypeError):
        view[0] = 1
    array = np.frombuffer(view, np.float32)
    assert not array.flags.writeable
    np.testing.assert_array_equal(array, np.arange(10_000, dtype=np.float32))


def test_a_block_is_freed_only_when_its_last_view_goes(memfd: int) -> None:
    writer, reader = pair(memfd, 256 * 1024)
    big = b"a" * (200 * 1024)
    offset = writer.place(big)
    array = np.frombuffer(memoryview(reader.take(offset, len(big)))[64:128], np.uint8)
    gc.collect()
    assert writer.place(big) == -1  # the slice itself is gone, but an array still views it
    assert bytes(array) == b"a" * 64
    del array
    assert writer.place(big) == offset
    assert writer.held == -(-(HEADER + len(big)) // ALIGN) * ALIGN


def test_a_placed_block_not_yet_taken_stays_held(memfd: int) -> None:
    writer, _ = pair(memfd, 256 * 1024)
    assert writer.place(b"x" * (200 * 1024)) >= 0
    writer.reclaim()
    assert writer.place(b"y" * (200 * 1024)) == -1


@pytest.mark.parametrize("offset, length", [
    (0, 10),            # the header's place
    (HEADER + 8, 10),   # not a block's start
    (HEADER, 11),       # a block of another length
    (HEADER * 100, 10),  # nothing placed there
    (2 * MIB, 10),      # past the end
    (HEADER, 2**63),    # a length past the end
    (HEADER, 0),
])
def test_the_engine_takes_only_a_placed_block_as_it_was_placed(
        memfd: int, offset: int, length: int) -> None:
    writer, reader = pair(memfd, MIB)
    assert writer.place(b"z" * 10) == HEADER
    with pytest.raises(ValueError, match="arena"):
        reader.take(offset, length)
    kept = reader.take(HEADER, 10)  # the refusals left the block as it was
    with pytest.raises(ValueError, match="not a placed message"):
        reader.take(HEADER, 10)  # taken already
    assert bytes(memoryview(kept)) == b"z" * 10


def test_messages_that_cannot_fit_are_refused(memfd: int) -> None:
    writer, _ = pair(memfd, 128 * 1024)
    assert writer.place(b"") == -1
    assert writer.place(b"q" * (128 * 1024 - HEADER + 1)) == -1
    assert writer.place(b"q" * (128 * 1024 - HEADER)) == HEADER


def test_the_freed_tail_is_given_back_to_the_kernel(memfd: int) -> None:
    writer, reader = pair(memfd, 128 * MIB)
    chunk = b"t" * (15 * MIB)
    views = [memoryview(reader.take(writer.place(chunk), len(chunk))) for _ in range(5)]
    assert os.fstat(memfd).st_blocks * 512 >= 75 * MIB
    for view in views:
        view.release()
    writer.reclaim()
    # What stays is the trim's slack above the highest block in use (none now): 16 MiB.
    assert os.fstat(memfd).st_blocks * 512 <= 17 * MIB
    assert writer.held == 0
