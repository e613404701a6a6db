"""Frames between a frontend process and the engine, over one Unix stream socket each.

A frame is a header (body length, kind, call id) and a body. A call is one gRPC call a
frontend took: it opens with CALL (method, deadline, peer, metadata, the client's certificate
properties and, for a unary request, the message), goes on with MESSAGE frames for a
client-streaming call (ended by HALF_CLOSE), and ends with the engine's STATUS; the engine's
answers are REPLY frames. CANCEL says the client went away. CREDIT lets the other side send
that many more messages of a stream (returned CREDIT_BATCH at a time): each side holds at
most WINDOW messages the other has not consumed, so a stream that is not read holds back its
sender, never the socket's other calls. READY, a frontend's first frame, says that its gRPC
server listens. A large message travels in an arena (server/multiproc/arena.py): a CALL
then names its block instead of carrying it, a stream's request message comes as PLACED (the
block's offset and length) instead of MESSAGE, and a large answer as PLACED_ANSWER or
PLACED_REPLY instead of ANSWER or REPLY.

A CALL or STATUS body is a u32-length-prefixed ``marshal`` head (strings, bytes, numbers and
tuples of them: no objects are built from it, and both ends are the same interpreter: the
engine and the frontends it started, checked by the kernel's peer credentials), then, for a
CALL, the request message's bytes. Frames are read by a protocol that parses them in the turn
their bytes arrive.
"""

from __future__ import annotations

import asyncio
import enum
import marshal
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import grpc

HEADER = struct.Struct("<IBQ")
_U32 = struct.Struct("<I")
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
    #: A frontend's own figures (server/metrics/frontends.py), every second.
    STATS = 10
    #: A stream's request message in the arena: its offset and length (arena.PLACEMENT).
    PLACED = 11
    #: ANSWER and REPLY with the message in the engine's arena (a PLACEMENT likewise).
    PLACED_ANSWER = 12
    PLACED_REPLY = 13


_KINDS = frozenset(Kind)


class FrameError(Exception):
    """A frame that does not parse: the other process is broken, not a client."""


class FrameWriter:
    """Frames for one socket, written together once per turn of the event loop: under load a
    turn produces many (answers of a batch, a stream's replies), and one write of them all
    costs one system call instead of one each."""

    def __init__(self, transport: asyncio.WriteTransport) -> None:
        self._transport = transport
        self._pending: list[bytes] = []
        self._loop = asyncio.get_running_loop()

    def send(self, kind: Kind, call: int, body: bytes = b"") -> None:
        if not self._pending:
            self._loop.call_soon(self._flush)
        self._pending += (HEADER.pack(len(body), kind, call), body)

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not self._transport.is_closing():
            self._transport.write(b"".join(pending))


class FrameReceiver(asyncio.Protocol):
    """A socket's frames, handed to ``on_frame(kind, call, body)`` as they complete, in the
    turn their last bytes arrive (no task, no await per frame). A frame that does not parse
    closes the socket; ``closed`` is done when the socket is, with the FrameError if one
    closed it."""

    def __init__(self, limit: int, on_frame: Callable[[int, int, bytes], None]) -> None:
        self._limit = limit
        self._on_frame = on_frame
        self._buffer = bytearray()
        self.transport: asyncio.Transport | None = None
        self.closed: asyncio.Future[FrameError | None] = \
            asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        at, size = 0, len(buffer)
        try:
            while size - at >= HEADER.size:
                length, kind, call = HEADER.unpack_from(buffer, at)
                if length > self._limit:
                    raise FrameError(
                        f"a frame of {length} bytes is past the limit of {self._limit}")
                if kind not in _KINDS:
                    raise FrameError(f"unknown frame kind {kind}")
                end = at + HEADER.size + length
                if end > size:
                    break
                with memoryview(buffer) as view:
                    body = bytes(view[at + HEADER.size:end])
                at = end
                self._on_frame(kind, call, body)
        except FrameError as exc:
            self._close(exc)
            return
        del buffer[:at]

    def _close(self, error: FrameError) -> None:
        if not self.closed.done():
            self.closed.set_result(error)
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


@dataclass(frozen=True, slots=True)
class CallOpening:
    """What the engine needs of a call the frontend took (CALL's body)."""

    method: str
    #: Seconds left before the client's deadline, when it set one.
    time_remaining: float | None
    peer: str
    metadata: Metadata
    auth: AuthContext
    #: The request of a unary-request call; None for a client-streaming one. In the engine,
    #: a view of the arena's block when the message was placed there.
    message: bytes | memoryview | None

    def encode(self, placed: tuple[int, int] | None = None) -> bytes:
        """The CALL's body; ``placed``: where the message is in the arena (it is then not
        in the body)."""
        where = placed if placed is not None else self.message is not None
        head = encode_head((self.method, self.time_remaining, self.peer, self.metadata,
                            self.auth, where))
        return head + self.message if self.message and placed is None else head

    @classmethod
    def decode(cls, body: bytes, take: Callable[[int, int], memoryview]) -> CallOpening:
        """The CALL's opening; a message placed in the arena is taken with ``take``
        (arena.take: a FrameError when there is no such block)."""
        method, remaining, peer, metadata, auth, where = decode_head(body, 6)
        message: bytes | memoryview | None
        if isinstance(where, tuple):
            if len(where) != 2:
                raise FrameError("a CALL's arena block is not an offset and a length")
            message = take(*where)
        else:
            size = _U32.unpack_from(body)[0]
            message = body[_U32.size + size:] if where else None
        return cls(method, remaining, peer, metadata, auth, message)


@dataclass(frozen=True, slots=True)
class CallStatus:
    """How a call ended (STATUS's body)."""

    code: grpc.StatusCode
    details: str = ""
    trailing: Metadata = ()

    def encode(self) -> bytes:
        return encode_head((self.code.value[0], self.details, self.trailing))

    @classmethod
    def decode(cls, body: bytes) -> CallStatus:
        code, details, trailing = decode_head(body, 3)
        return cls(_CODES.get(code, grpc.StatusCode.UNKNOWN), details, trailing)


def encode_head(values: tuple[Any, ...]) -> bytes:
    """A frame body's head: plain values (str, bytes, numbers, None, and tuples, lists and
    dicts of them) in marshal, length-prefixed."""
    head = marshal.dumps(values)
    return _U32.pack(len(head)) + head


def decode_head(body: bytes, fields: int) -> tuple[Any, ...]:
    """The head of a frame body, a tuple of ``fields`` values (FrameError if it is not)."""
    if len(body) < _U32.size:
        raise FrameError("frame body ends early")
    size = _U32.unpack_from(body)[0]
    if _U32.size + size > len(body):
        raise FrameError("frame body ends early")
    try:
        head = marshal.loads(memoryview(body)[_U32.size:_U32.size + size])
    except (EOFError, ValueError, TypeError) as exc:
        raise FrameError(f"a frame head that does not parse: {exc}") from None
    if not isinstance(head, tuple) or len(head) != fields:
        raise FrameError("a frame head of the wrong form")
    return head


def credit(count: int) -> bytes:
    return _U32.pack(count)


def credit_count(body: bytes) -> int:
    if len(body) != _U32.size:
        raise FrameError("a CREDIT frame carries one u32")
    count: int = _U32.unpack(body)[0]
    return count
