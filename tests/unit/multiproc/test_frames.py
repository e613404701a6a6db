"""The frames between frontends and the engine: what is written is read back the same, and a
broken frame is a FrameError, never a wrong call."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st

from server.multiproc.frames import (
    HEADER,
    CallOpening,
    CallStatus,
    FrameError,
    FrameWriter,
    Kind,
    credit,
    credit_count,
    read_frame,
)

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
    assert CallOpening.decode(opening.encode()) == opening


@given(code=st.sampled_from(list(grpc.StatusCode)), details=texts, pairs=metadata)
def test_a_status_reads_back_as_written(code: grpc.StatusCode, details: str,
                                        pairs: list[tuple[str, str | bytes]]) -> None:
    status = CallStatus(code, details, tuple(pairs))
    assert CallStatus.decode(status.encode()) == status


def test_a_credit_carries_its_count() -> None:
    assert credit_count(credit(7)) == 7


class _Sink:
    """A StreamWriter's part FrameWriter uses."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def is_closing(self) -> bool:
        return False

    def write(self, data: bytes) -> None:
        self.written.append(data)


async def test_frames_sent_in_one_turn_go_out_in_one_write_and_read_back_in_order() -> None:
    sink = _Sink()
    frames = FrameWriter(sink)  # type: ignore[arg-type]
    frames.send(Kind.CALL, 1, b"abc")
    frames.send(Kind.CANCEL, 2)
    assert sink.written == []
    await asyncio.sleep(0)
    assert len(sink.written) == 1
    reader = asyncio.StreamReader()
    reader.feed_data(sink.written[0])
    reader.feed_eof()
    assert await read_frame(reader, 100) == (Kind.CALL, 1, b"abc")
    assert await read_frame(reader, 100) == (Kind.CANCEL, 2, b"")
    with pytest.raises(asyncio.IncompleteReadError):
        await read_frame(reader, 100)


@pytest.mark.parametrize("data", [
    HEADER.pack(101, Kind.REPLY, 1) + b"x" * 101,  # past the limit
    HEADER.pack(0, 99, 1),  # no such kind
], ids=["too-long", "unknown-kind"])
async def test_a_bad_frame_is_a_frame_error(data: bytes) -> None:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    with pytest.raises(FrameError):
        await read_frame(reader, 100)


def test_a_truncated_opening_is_a_frame_error() -> None:
    body = CallOpening("/a/b", None, "peer", (("k", "v"),), {}, b"m").encode()
    with pytest.raises(FrameError):
        CallOpening.decode(body[:10])
