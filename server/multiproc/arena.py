"""A frontend's request arena: large inference requests reach the engine through shared
memory, not the socket.

Each frontend makes one memfd of ``--frontend-arena-bytes`` (no name anywhere: it goes when
the last process holding it does, whatever kills them) and hands it to the engine with the
first bytes on its socket (SCM_RIGHTS). A ModelInfer or ModelStreamInfer message of at least
ARENA_MIN_BYTES is copied once into a free block of it, and its frame carries the block's
offset and length instead of the bytes. The engine takes the block as a read-only buffer: the
codec decodes straight from it and the batch is gathered from it, with no copy in between;
when nothing views the message any more (its request answered and its arrays dropped), the
block is marked free in the arena itself, and the frontend reclaims it when it next places a
message (csrc/arena.hpp). Over the socket instead, a 1 MiB message was copied five times in
user space and twice in the kernel, in reads of a quarter of it at a time.

Smaller messages, the other methods' messages, and everything when the compiled path is off
(PEREGRINE_NATIVE=0) go over the socket as before. The arena is a bound: a unary request that
finds no room is refused RESOURCE_EXHAUSTED; a stream's message goes over the socket instead
(refusing it would end the stream and its accepted requests), where the stream's window
bounds it.
"""

from __future__ import annotations

import os
import socket
import struct

from server import _native
from server.services import INFERENCE_SERVICE

#: Messages smaller than this go over the socket: copying them there costs less than a block.
ARENA_MIN_BYTES = 16 * 1024
#: The methods whose messages may be placed: their handlers take the raw message bytes.
PLACED_METHODS = frozenset(f"/{INFERENCE_SERVICE}/{name}"
                           for name in ("ModelInfer", "ModelStreamInfer"))
#: A frontend's first bytes on its socket: its arena's size (0: none), with the memfd.
_HELLO = struct.Struct("<Q")
#: A placed message's offset and length, as a PLACED frame's body.
PLACEMENT = struct.Struct("<QQ")


class ArenaFull(Exception):
    """No room in the arena for a message."""

    def __init__(self, arena: RequestArena, size: int) -> None:
        super().__init__(
            f"the frontend's request arena ({arena.size} bytes, --frontend-arena-bytes) "
            f"holds {arena.held} bytes of requests the engine has not finished with and has "
            f"no room for a message of {size} bytes")


class RequestArena:
    """The frontend's side: its memfd, mapped, and the blocks it placed."""

    def __init__(self, size: int) -> None:
        fd = os.memfd_create("peregrine-request-arena", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            self._writer = _native.ArenaWriter(fd, size)
        except BaseException:
            os.close(fd)
            raise
        #: The memfd, until the engine has it (send_hello closes it).
        self.fd: int | None = fd

    @property
    def size(self) -> int:
        return self._writer.size

    @property
    def held(self) -> int:
        """Bytes of placed messages the engine has not freed (as last reclaimed)."""
        return self._writer.held

    def reclaim(self) -> None:
        """Take back what the engine freed (``held`` is then current)."""
        self._writer.reclaim()

    def place(self, method: str, message: bytes | memoryview) -> tuple[int, int] | None:
        """Where ``message`` went in the arena; None when it goes over the socket (too small,
        or not a method whose messages are placed). ArenaFull when there is no room."""
        if len(message) < ARENA_MIN_BYTES or method not in PLACED_METHODS:
            return None
        offset = self._writer.place(message)
        if offset < 0:
            raise ArenaFull(self, len(message))
        return offset, len(message)


def send_hello(connection: socket.socket, arena: RequestArena | None) -> None:
    """The frontend's first bytes to the engine: the arena's size and its memfd (then closed
    here: the mapping keeps it)."""
    if arena is None or arena.fd is None:
        connection.sendall(_HELLO.pack(0))
        return
    socket.send_fds(connection, [_HELLO.pack(arena.size)], [arena.fd])
    os.close(arena.fd)
    arena.fd = None


def receive_hello(connection: socket.socket, timeout: float) -> _native.ArenaReader | None:
    """The engine's side of send_hello, blocking for at most ``timeout`` seconds (run it in
    a thread): the frontend's arena, or None when it has none. OSError when the hello does
    not come or does not parse."""
    connection.settimeout(timeout)
    try:
        data, fds, _, _ = socket.recv_fds(connection, _HELLO.size, 1,
                                              socket.MSG_CMSG_CLOEXEC)
    finally:
        connection.setblocking(False)
    try:
        if len(data) != _HELLO.size:
            raise OSError("a frontend's hello ended early")
        size: int = _HELLO.unpack(data)[0]
        if (size == 0) != (not fds):
            raise OSError("a frontend's hello does not match its descriptors")
        return _native.ArenaReader(fds[0], size) if fds else None
    finally:
        for fd in fds:
            os.close(fd)
