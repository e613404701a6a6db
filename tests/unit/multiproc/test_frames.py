"""The frames between frontends and the engine: what is written is read back the same, and a
broken frame is a FrameError, never a wrong call."""

from __future__ import annotations

import asyncio
import functools

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.multiproc.arena import take
from server.multiproc.frames import (
    HEADER,
    CallOpening,
    CallStatus,
    FrameError,
    FrameReceiver,
    FrameWriter,
    Kind,
    credit,
    credit_count,
)

#: The engine's take for a frontend without an arena.
NO_ARENA = functools.partial(take, None)
texts = st.text(max_size=40)
metadata = st.lists(st.tuples(texts, st.one_of(texts, st.binary(max_size=40))), max_size=5)


@given(method=texts, remaining=st.one_of(st.none(), st.floats(0, 1e6)), peer=texts,
       pairs=metadata,
       auth=st.dictionaries(texts, st.lists(st.binary(max_size=20), max_size=3), max_size=3),
       message=st.one_of(st.none(), st.binary(max_size=200)))
def test_a_call_opening_reads_back_as_written(
    method: str, remaining: float | None, peer: str,
    pairs: list[tuple[str, str | bytes]], auth: dict[str, list[bytes]], message: bytes | None,
) -> None:
    opening = CallOpening(method, remaining, peer, tuple(pairs), auth, message)
    assert CallOpening.decode(opening.encode(), NO_ARENA) == opening


@given(code=st.sampled_from(list(grpc.StatusCode)), details=texts, pairs=metadata)
def test_a_status_reads_back_as_written(code: grpc.StatusCode, details: str,
                                        pairs: list[tuple[str, str | bytes]]) -> None:
    status = CallStatus(code, details, tuple(pairs))
    assert CallStatus.decode(status.encode()) == status


def test_a_credit_carries_its_count() -> None:
    assert credit_count(credit(7)) == 7


class _Transport:
    """The part of a transport that FrameWriter and FrameReceiver use."""

    def __init__(self) -> None:
        self.written: list[bytes] = []
        self.closed = False

    def is_closing(self) -> bool:
        return self.closed

    def write(self, data: bytes) -> None:
        self.written.append(data)

    def close(self) -> None:
        self.closed = True


def _receiver(limit: int) -> tuple[FrameReceiver, list[tuple[int, int, bytes]], _Transport]:
    frames: list[tuple[int, int, bytes]] = []
    receiver = FrameReceiver(limit, lambda *frame: frames.append(frame))
    transport = _Transport()
    receiver.transport = transport  # type: ignore[assignment]
    return receiver, frames, transport


async def test_frames_sent_in_one_turn_go_out_in_one_write_and_read_back_in_order() -> None:
    sink = _Transport()
    frames = FrameWriter(sink)  # type: ignore[arg-type]
    frames.send(Kind.CALL, 1, b"abc")
    frames.send(Kind.CANCEL, 2)
    assert sink.written == []
    await asyncio.sleep(0)
    assert len(sink.written) == 1
    receiver, received, _ = _receiver(100)
    receiver.data_received(sink.written[0])
    assert received == [(Kind.CALL, 1, b"abc"), (Kind.CANCEL, 2, b"")]


@given(cuts=st.lists(st.integers(0, 60), max_size=6))
def test_frames_split_anywhere_across_reads_arrive_whole_and_in_order(cuts: list[int]) -> None:
    data = b"".join(HEADER.pack(len(body), Kind.REPLY, n) + body
                    for n, body in enumerate((b"first", b"", b"x" * 20)))

    async def feed() -> list[tuple[int, int, bytes]]:
        receiver, received, transport = _receiver(100)
        at = 0
        for cut in sorted(c for c in cuts if c < len(data)):
            receiver.data_received(data[at:cut])
            at = cut
        receiver.data_received(data[at:])
        assert not transport.closed
        return received

    assert asyncio.run(feed()) == [(Kind.REPLY, 0, b"first"), (Kind.REPLY, 1, b""),
                                   (Kind.REPLY, 2, b"x" * 20)]


@pytest.mark.parametrize("data", [
    HEADER.pack(101, Kind.REPLY, 1) + b"x" * 101,  # past the limit
    HEADER.pack(0, 99, 1),  # no such kind
], ids=["too-long", "unknown-kind"])
async def test_a_bad_frame_closes_the_socket_with_a_frame_error(data: bytes) -> None:
    receiver, received, transport = _receiver(100)
    receiver.data_received(data)
    assert received == []
    assert transport.closed
    assert isinstance(receiver.closed.result(), FrameError)


async def test_a_frame_the_handler_refuses_closes_the_socket() -> None:
    def refuse(kind: int, call: int, body: bytes) -> None:
        raise FrameError("call 1 opened twice")

    receiver = FrameReceiver(100, refuse)
    transport = _Transport()
    receiver.transport = transport  # type: ignore[assignment]
    receiver.data_received(HEADER.pack(0, Kind.CALL, 1))
    assert transport.closed
    assert str(receiver.closed.result()) == "call 1 opened twice"


@pytest.mark.parametrize("cut", [2, 10], ids=["in-the-length", "in-the-head"])
def test_a_truncated_opening_is_a_frame_error(cut: int) -> None:
    body = CallOpening("/a/b", None, "peer", (("k", "v"),), {}, b"m").encode()
    with pytest.raises(FrameError):
        CallOpening.decode(body[:cut], NO_ARENA)


def test_a_head_that_is_not_marshal_is_a_frame_error() -> None:
    with pytest.raises(FrameError):
        CallStatus.decode(b"\x03\x00\x00\x00\xff\xff\xff")


def test_a_call_opening_names_its_placed_message_instead_of_carrying_it() -> None:
    opening = CallOpening("/a/b", 2.5, "peer", (("k", "v"),), {}, b"m" * 1000)
    body = opening.encode(placed=(64, 1000))
    assert len(body) < 200  # the message is not in the body
    taken: list[tuple[int, int]] = []

    def take_block(offset: int, length: int) -> memoryview:
        taken.append((offset, length))
        return memoryview(b"m" * length)

    decoded = CallOpening.decode(body, take_block)
    assert taken == [(64, 1000)] and decoded.message == b"m" * 1000
    assert decoded.method == "/a/b" and decoded.time_remaining == 2.5
    with pytest.raises(FrameError, match="no arena"):
        CallOpening.decode(body, NO_ARENA)  # a frontend without an arena names no block
