"""Frames between a frontend process and the engine, over one Unix stream socket each.

A frame is a header (body length, kind, call id) and a body. A call is one gRPC call a
frontend took: it opens with CALL (method, deadline, peer, metadata, the client's certificate
properties and, for a unary request, the message), goes on with MESSAGE frames for a
client-streaming call (ended by HALF_CLOSE), and ends with the engine's STATUS; the engine's
answers are REPLY frames. CANCEL says the client went away. CREDIT lets the other side send
that many more messages of a stream (returned CREDIT_BATCH at a time): each side holds at
most WINDOW messages the other has not consumed, so a stream that is not read holds back its
sender, never the socket's other calls. READY, a frontend's first frame, says that its gRPC
server listens.

Strings and byte strings are u32-length-prefixed; nothing is pickled.
"""

from __future__ import annotations

import asyncio
import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

HEADER = struct.Struct("<IBQ")
_U32 = struct.Struct("<I")
_F64 = struct.Struct("<d")
#: Messages of one stream sent and not yet consumed by the other side.
WINDOW = 16
#: Consumed messages returned in one CREDIT frame. Half the window: the sender is never left
#: waiting on credits the receiver holds back, since a receiver that consumed fewer still
#: holds over half the window of unread messages, and that is backpressure meant.
CREDIT_BATCH = WINDOW // 2
#: A value in metadata: str, or bytes for a binary ("-bin") key.
MetadataValue = str | bytes
Metadata = tuple[tuple[str, MetadataValue], ...]
#: The client certificate's properties (grpc.aio's auth_context()).
AuthContext = dict[str, list[bytes]]
_CODES = {code.value[0]: code for code in grpc.StatusCode}


class Kind(enum.IntEnum):
    CALL = 1
    MESSAGE = 2
    HALF_CLOSE = 3
    CANCEL = 4
    CREDIT = 5
    REPLY = 6
    STATUS = 7
    #: A frontend's first frame: its gRPC server is listening.
    READY = 8
    #: A unary answer: the one REPLY and an OK STATUS without trailing metadata, in one.
    ANSWER = 9


class FrameError(Exception):
    """A frame that does not parse: the other process is broken, not a client."""


class _Writer:
    def __init__(self) -> None:
        self.parts: list[bytes] = []

    def data(self, value: bytes) -> None:
        self.parts += (_U32.pack(len(value)), value)

    def text(self, value: str) -> None:
        self.data(value.encode())

    def u32(self, value: int) -> None:
        self.parts.append(_U32.pack(value))

    def f64(self, value: float) -> None:
        self.parts.append(_F64.pack(value))

    def metadata(self, pairs: Sequence[tuple[str, MetadataValue]]) -> None:
        self.u32(len(pairs))
        for key, value in pairs:
            self.text(key)
            binary = isinstance(value, bytes)
            self.parts.append(b"\x01" if binary else b"\x00")
            self.data(value if isinstance(value, bytes) else value.encode())

    def body(self) -> bytes:
        return b"".join(self.parts)


class _Reader:
    def __init__(self, body: bytes | memoryview) -> None:
        self._body = memoryview(body)
        self._at = 0

    def _take(self, size: int) -> memoryview:
        end = self._at + size
        if end > len(self._body):
            raise FrameError("frame body ends early")
        piece = self._body[self._at:end]
        self._at = end
        return piece

    def data(self) -> bytes:
        return bytes(self._take(self.u32()))

    def text(self) -> str:
        return self.data().decode()

    def u32(self) -> int:
        value: int = _U32.unpack(self._take(4))[0]
        return value

    def f64(self) -> float:
        value: float = _F64.unpack(self._take(8))[0]
        return value

    def metadata(self) -> Metadata:
        pairs = []
        for _ in range(self.u32()):
            key = self.text()
            binary = self.flag()
            value = self.data()
            pairs.append((key, value if binary else value.decode()))
        return tuple(pairs)

    def flag(self) -> bool:
        return bytes(self._take(1)) == b"\x01"

    def rest(self) -> bytes:
        return bytes(self._body[self._at:])


class FrameWriter:
    """Frames for one socket, written together once per turn of the event loop: under load a
    turn produces many (answers of a batch, a stream's replies), and one write of them all
    costs one system call instead of one each."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, kind: Kind, call: int, body: bytes = b"") -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending += (HEADER.pack(len(body), kind, call), body)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not self._writer.is_closing():
            self._writer.write(b"".join(pending))


async def read_frame(reader: asyncio.StreamReader, limit: int) -> tuple[Kind, int, bytes]:
    """The next frame; IncompleteReadError at the end of the stream."""
    length, kind, call = HEADER.unpack(await reader.readexactly(HEADER.size))
    if length > limit:
        raise FrameError(f"a frame of {length} bytes is past the limit of {limit}")
    try:
        return Kind(kind), call, await reader.readexactly(length)
    except ValueError:
        raise FrameError(f"unknown frame kind {kind}") from None


@dataclass(frozen=True, slots=True)
class CallOpening:
    """What the engine needs of a call the frontend took (CALL's body)."""

    method: str
    #: Seconds left before the client's deadline, when it set one.
    time_remaining: float | None
    peer: str
    metadata: Metadata
    auth: AuthContext
    #: The request of a unary-request call; None for a client-streaming one.
    message: bytes | None

    def encode(self) -> bytes:
        out = _Writer()
        out.text(self.method)
        out.f64(-1.0 if self.time_remaining is None else max(self.time_remaining, 0.0))
        out.text(self.peer)
        out.metadata(self.metadata)
        out.u32(len(self.auth))
        for key, values in self.auth.items():
            out.text(key)
            out.u32(len(values))
            for value in values:
                out.data(value)
        out.parts.append(b"\x00" if self.message is None else b"\x01")
        if self.message is not None:
            out.parts.append(self.message)
        return out.body()

    @classmethod
    def decode(cls, body: bytes) -> CallOpening:
        read = _Reader(body)
        method = read.text()
        remaining = read.f64()
        peer = read.text()
        metadata = read.metadata()
        auth: AuthContext = {}
        for _ in range(read.u32()):
            key = read.text()
            auth[key] = [read.data() for _ in range(read.u32())]
        has_message = read.flag()
        return cls(method, None if remaining < 0 else remaining, peer, metadata, auth,
                   read.rest() if has_message else None)


@dataclass(frozen=True, slots=True)
class CallStatus:
    """How a call ended (STATUS's body)."""

    code: grpc.StatusCode
    details: str = ""
    trailing: Metadata = ()

    def encode(self) -> bytes:
        out = _Writer()
        out.u32(self.code.value[0])
        out.text(self.details)
        out.metadata(self.trailing)
        return out.body()

    @classmethod
    def decode(cls, body: bytes) -> CallStatus:
        read = _Reader(body)
        code = _CODES.get(read.u32(), grpc.StatusCode.UNKNOWN)
        return cls(code, read.text(), read.metadata())


def credit(count: int) -> bytes:
    return _U32.pack(count)


def credit_count(body: bytes) -> int:
    return _Reader(body).u32()
