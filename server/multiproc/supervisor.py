"""The engine's frontend processes: started on one port (and the HTTP port, with
--allow-http), restarted when one dies, stopped at shutdown once the models are drained.

The ports are reserved by the engine with SO_REUSEPORT before any frontend starts (so port 0
picks one port for all of them, and nothing else takes it while a frontend restarts); the
reserving sockets never listen, so only the frontends receive connections. Each frontend
connects to the engine's Unix socket, in the abstract namespace (nothing on disk to leave
behind, whatever kills the engine). Any local process could connect to such a socket, so the
engine takes a connection only from a process it started: the kernel's peer credentials
(SO_PEERCRED) must name one of its frontends' pids. (A frontend asserts each call's peer and
client certificate, which the engine's security checks then trust.)
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import secrets
import signal
import socket
import struct
import subprocess
import sys
from collections.abc import Callable

from server.metrics.frontends import FrontendStats
from server.multiproc.arena import Arena, receive_hello, send_hello
from server.multiproc.engine import EngineLink, HandlerTable
from server.multiproc.frontend import frame_limit, settings_json
from server.packing import native_enabled
from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: How long the frontends may take to listen at start.
START_TIMEOUT_S = 60.0
#: How often a dead frontend is looked for.
WATCH_INTERVAL_S = 0.5
#: glibc malloc settings of the frontends, unless the environment sets its own. A frontend
#: takes each large message as a new bytes object from gRPC and frees it as soon as the
#: message is in the arena; by default glibc then hands the top of its heap back to the kernel
#: and takes it again for the next message, a page fault per 4 KiB (about 190 per 1 MiB
#: request, measured). Keeping up to 64 MiB of freed heap, and taking messages up to 32 MiB
#: (glibc's most) from the heap rather than mmap, costs at most that much resident memory.
FRONTEND_MALLOC = {"MALLOC_TRIM_THRESHOLD_": str(64 << 20),
                   "MALLOC_MMAP_THRESHOLD_": str(32 << 20)}


def _stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """Wait ``grace`` seconds for a process told to stop, then kill it."""
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def _peer_pid(connection: socket.socket) -> int:
    """The connecting process's pid, from the kernel (SO_PEERCRED: pid, uid, gid)."""
    credentials = connection.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                        struct.calcsize("3i"))
    pid: int = struct.unpack("3i", credentials)[0]
    return pid


def reserve_port(host: str, port: int, what: str = "gRPC") -> socket.socket:
    """A bound, non-listening socket holding ``host:port`` (port 0: a free one) for sockets
    that set SO_REUSEPORT, as grpc.so_reuseport does and the HTTP server does."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    reserved = socket.socket(family, kind, proto)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind(address)
    except OSError as exc:
        reserved.close()
        raise OSError(f"cannot bind {what} to {host}:{port}: {exc}") from exc
    return reserved


class Frontends:
    """``count`` frontend processes forwarding to ``table`` through one Unix socket."""

    def __init__(self, count: int, settings: ServerSettings, table: HandlerTable) -> None:
        self._count = count
        self._settings = settings
        self._table = table
        self._limit = frame_limit(settings)
        self._processes: list[subprocess.Popen[bytes]] = []
        self._links: set[asyncio.Task[None]] = set()
        self._ready = 0
        self._all_ready = asyncio.Event()
        self._stopping = False
        self._reserved: list[socket.socket] = []
        self._address = ""
        self._listening: socket.socket | None = None
        self._acceptor: asyncio.Task[None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0
        #: The HTTP/REST port every frontend serves (--allow-http), else 0.
        self.http_port = 0
        #: Each frontend's request arena (server/multiproc/arena.py): none when the
        #: compiled path is off (PEREGRINE_NATIVE=0, read at start), the arena being part of it.
        self.arena_bytes = settings.arena_bytes if native_enabled() else 0
        #: Frontends restarted after dying.
        self.restarts = 0
        #: The latest figures of each frontend, by slot (1..count).
        self.stats: dict[int, FrontendStats] = {}

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    @property
    def address(self) -> str:
        """The engine's socket: a name in the abstract namespace (it starts with a NUL)."""
        return self._address

    async def start(self) -> int:
        """Start the frontends; returns the port they listen on once every one listens."""
        settings = self._settings
        self._reserved.append(reserve_port(settings.host, settings.grpc_port))
        self.port = int(self._reserved[0].getsockname()[1])
        if settings.allow_http:
            try:
                self._reserved.append(reserve_port(settings.http_host, settings.http_port,
                                                   "HTTP"))
            except OSError:
                self._reserved.pop().close()
                raise
            self.http_port = int(self._reserved[1].getsockname()[1])
        self._address = f"\0peregrine-engine-{os.getpid()}-{secrets.token_hex(8)}"
        listening = self._listening = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listening.bind(self._address)  # uvloop takes no abstract name: a socket it takes
        listening.listen()
        listening.setblocking(False)
        self._acceptor = asyncio.get_running_loop().create_task(self._accept(listening))
        self._processes = [self._spawn() for _ in range(self._count)]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + START_TIMEOUT_S
        problem = ""
        while not self._all_ready.is_set() and not problem:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_ready.wait(), WATCH_INTERVAL_S)
            if any(p.poll() is not None for p in self._processes):
                problem = "a frontend exited at start"
            elif loop.time() > deadline:
                problem = f"the frontends did not listen within {START_TIMEOUT_S:g} s"
        if problem:
            await self.stop(0.0)
            raise OSError(f"{problem} (port {self.port}; see their log lines)")
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        return self.port

    def _spawn(self) -> subprocess.Popen[bytes]:
        settings = settings_json(self._with_port())
        return subprocess.Popen(
            [sys.executable, "-m", "server.multiproc.frontend",
             "--engine", self._address[1:], "--settings", settings],
            env={**FRONTEND_MALLOC, **os.environ})

    def _with_port(self) -> ServerSettings:
        """The frontends' settings: the ports taken, and the arena's size."""
        return dataclasses.replace(
            self._settings, grpc_port=self.port,
            http_port=self.http_port or self._settings.http_port,
            frontend_arena_bytes=self.arena_bytes)

    def _frontend_ready(self) -> None:
        self._ready += 1
        if self._ready >= self._count:
            self._all_ready.set()

    async def _accept(self, listening: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            connection, _ = await loop.sock_accept(listening)
            peer_pid = _peer_pid(connection)
            if peer_pid not in self.pids:
                log.error("refused a connection to the engine's socket from a process that "
                          "is not one of its frontends", extra={"pid": peer_pid})
                connection.close()
                continue
            task = loop.create_task(self._link(connection, peer_pid))
            self._links.add(task)
            task.add_done_callback(self._links.discard)

    async def _link(self, connection: socket.socket, peer_pid: int) -> None:
        """A frontend's link: the hellos (the frontend's request arena, and an answer arena
        of the same size when it has one), then its frames until it goes."""
        try:
            requests = await asyncio.to_thread(receive_hello, connection, START_TIMEOUT_S)
            answers = Arena(requests.size, "answer") if requests is not None else None
            await asyncio.to_thread(send_hello, connection, answers)
        except OSError as exc:
            log.error("a frontend's hello did not come: closing its socket",
                      extra={"pid": peer_pid, "error": str(exc)})
            connection.close()
            return
        link = EngineLink(self._table, self._limit, self._frontend_ready,
                          self._stats_of(peer_pid), requests, answers)
        receiver = link.receiver
        transport, _ = await asyncio.get_running_loop().connect_accepted_socket(
            lambda: receiver, connection)
        await link.serve(transport)

    def _stats_of(self, pid: int) -> Callable[[FrontendStats], None]:
        def keep(stats: FrontendStats) -> None:
            if stats.pid == pid and pid in self.pids:
                self.stats[self.pids.index(pid) + 1] = stats

        return keep

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for index, process in enumerate(self._processes):
                if self._stopping or process.poll() is None:
                    continue
                log.error("frontend process died: starting another",
                          extra={"pid": process.pid, "returncode": process.returncode})
                self._processes[index] = self._spawn()
                self.stats.pop(index + 1, None)
                self.restarts += 1

    async def stop(self, grace: float) -> None:
        """SIGTERM every frontend (each finishes its calls within ``grace``), then SIGKILL
        what is left; close the socket and free the port."""
        self._stopping = True
        if self._watcher is not None:
            self._watcher.cancel()
            await asyncio.gather(self._watcher, return_exceptions=True)
        for process in self._processes:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(asyncio.to_thread(_stop_process, p, grace + 1.0)
                               for p in self._processes))
        if self._acceptor is not None:
            self._acceptor.cancel()
            await asyncio.gather(self._acceptor, return_exceptions=True)
        if self._listening is not None:
            self._listening.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        for reserved in self._reserved:
            reserved.close()
        self._reserved = []
