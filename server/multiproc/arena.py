"""The arenas between a frontend process and the engine: large messages cross in shared
memory, not over the socket.

Each side makes one memfd of ``--frontend-arena-bytes`` per link (no name anywhere: it goes
when the last process holding it does, whatever kills them) and hands it to the other with its
first bytes on the socket (SCM_RIGHTS). The frontend's is the **request arena**: a ModelInfer
or ModelStreamInfer message of at least ARENA_MIN_BYTES is copied once into a free block, and
its frame carries the block's offset and length instead of the bytes. The engine takes the
block as a read-only buffer: the codec decodes straight from it and the batch is gathered
from it, with no copy in between; when nothing views the message any more (its request
answered and its arrays dropped), the block is marked free in the arena itself, and the
frontend reclaims it when it next places a message (csrc/arena.hpp). The engine's is the
**answer arena**: an answer of at least ARENA_MIN_BYTES goes the same way back, and the
frontend copies it out for gRPC as it arrives, which frees its block. Over the socket, a
1 MiB message was copied five times in user space and twice in the kernel, in reads of a
quarter of it at a time.

Smaller messages, the other methods' requests, and everything when the compiled path is off
(PEREGRINE_NATIVE=0) go over the socket as before. The request arena is a bound: a unary
request that finds no room is refused RESOURCE_EXHAUSTED; a stream's message goes over the
socket instead (refusing it would end the stream and its accepted requests), where the
stream's window bounds it. An answer that finds no room goes over the socket.
"""

from __future__ import annotations

import os
import socket
import struct

from server import _native
from server.multiproc.frames import FrameError
from server.services import INFERENCE_SERVICE

#: Messages smaller than this go over the socket: copying them there costs less than a block.
ARENA_MIN_BYTES = 16 * 1024
#: The methods whose messages may be placed: their handlers take the raw message bytes.
PLACED_METHODS = frozenset(f"/{INFERENCE_SERVICE}/{name}"
                           for name in ("ModelInfer", "ModelStreamInfer"))
#: Each side's first bytes on the socket: its arena's size (0: none), with the memfd.
_HELLO = struct.Struct("<Q")
#: A placed message's offset and length, as a PLACED frame's body.
PLACEMENT = struct.Struct("<QQ")


class ArenaFull(Exception):
    """No room in an arena for a message."""

    def __init__(self, arena: Arena, size: int) -> None:
        owner = "frontend's" if arena.purpose == "request" else "engine's"
        super().__init__(
            f"the {owner} {arena.purpose} arena ({arena.size} bytes, --frontend-arena-bytes) "
            f"holds {arena.held} bytes of messages not yet finished with and has no room for "
            f"a message of {size} bytes")


class Arena:
    """The placing side of an arena: its memfd, mapped, and the blocks placed in it."""

    def __init__(self, size: int, purpose: str) -> None:
        #: What travels through it: "request" (a frontend's) or "answer" (the engine's).
        self.purpose = purpose
        fd = os.memfd_create(f"peregrine-{purpose}-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._writer = _native.ArenaWriter(fd, size)
        except BaseException:
            os.close(fd)
            raise
        #: The memfd, until the other side has it (send_hello closes it).
        self.fd: int | None = fd

    @property
    def size(self) -> int:
        return self._writer.size

    @property
    def held(self) -> int:
        """Bytes of placed messages the other side has not freed (as last reclaimed)."""
        return self._writer.held

    def reclaim(self) -> None:
        """Take back what the other side freed (``held`` is then current)."""
        self._writer.reclaim()

    def place(self, message: bytes | memoryview) -> tuple[int, int]:
        """Copy ``message`` into a free block: its offset and length. ArenaFull when there
        is no room."""
        offset = self._writer.place(message)
        if offset < 0:
            raise ArenaFull(self, len(message))
        return offset, len(message)


def placed_request(method: str, message: bytes | memoryview) -> bool:
    """Whether a frontend places this call's message in its arena."""
    return len(message) >= ARENA_MIN_BYTES and method in PLACED_METHODS


def take(reader: _native.ArenaReader | None, offset: int, length: int) -> memoryview:
    """The message the other side placed at ``offset``, as a read-only view: its block is
    freed when the last view of it goes. FrameError when the frame named no such block."""
    if reader is None:
        raise FrameError("a frame names an arena block, and the other side has no arena")
    try:
        return memoryview(reader.take(offset, length))
    except (ValueError, TypeError, OverflowError) as exc:
        raise FrameError(str(exc)) from None


def take_placement(reader: _native.ArenaReader | None, body: bytes) -> memoryview:
    """The message a PLACED, PLACED_ANSWER or PLACED_REPLY frame names (its body is a
    PLACEMENT)."""
    if len(body) != PLACEMENT.size:
        raise FrameError("a placement frame of the wrong size")
    return take(reader, *PLACEMENT.unpack(body))


def send_hello(connection: socket.socket, arena: Arena | None) -> None:
    """The first bytes each side sends the other (the frontend first): its arena's size and
    its memfd (then closed here: the mapping keeps it)."""
    if arena is None or arena.fd is None:
        connection.sendall(_HELLO.pack(0))
        return
    socket.send_fds(connection, [_HELLO.pack(arena.size)], [arena.fd])
    os.close(arena.fd)
    arena.fd = None


def receive_hello(connection: socket.socket, timeout: float) -> _native.ArenaReader | None:
    """The other side's send_hello, blocking for at most ``timeout`` seconds (run it in a
    thread): its arena, or None when it has none. OSError when the hello does not come or
    does not parse."""
    connection.settimeout(timeout)
    try:
        data, fds, _, _ = socket.recv_fds(connection, _HELLO.size, 1,
                                              socket.MSG_CMSG_CLOEXEC)
    finally:
        connection.setblocking(False)
    try:
        if len(data) != _HELLO.size:
            raise OSError("the hello ended early")
        size: int = _HELLO.unpack(data)[0]
        if (size == 0) != (not fds):
            raise OSError("the hello does not match its descriptors")
        return _native.ArenaReader(fds[0], size) if fds else None
    finally:
        for fd in fds:
            os.close(fd)
