"""The engine's frontend processes: started on one port, restarted when one dies, stopped
first at shutdown.

The port is reserved by the engine with SO_REUSEPORT before any frontend starts (so port 0
picks one port for all of them, and nothing else takes it while a frontend restarts); the
reserving socket never listens, so only the frontends receive connections. Each frontend
connects to the engine's Unix socket in a private directory (mode 0700), removed at stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from server.multiproc.engine import EngineLink, HandlerTable
from server.multiproc.frontend import frame_limit, settings_json
from server.settings import ServerSettings

log = logging.getLogger(__name__)

#: How long the frontends may take to listen at start.
START_TIMEOUT_S = 60.0
#: How often a dead frontend is looked for.
WATCH_INTERVAL_S = 0.5


def _stop_process(process: subprocess.Popen[bytes], grace: float) -> None:
    """Wait ``grace`` seconds for a process told to stop, then kill it."""
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=5)


def reserve_port(host: str, port: int) -> socket.socket:
    """A bound, non-listening socket holding ``host:port`` (port 0: a free one) for sockets
    that set SO_REUSEPORT, as grpc.so_reuseport does."""
    family, kind, proto, _, address = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    reserved = socket.socket(family, kind, proto)
    reserved.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        reserved.bind(address)
    except OSError as exc:
        reserved.close()
        raise OSError(f"cannot bind gRPC to {host}:{port}: {exc}") from exc
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
        self._reserved: socket.socket | None = None
        self._directory: Path | None = None
        self._unix: asyncio.Server | None = None
        self._watcher: asyncio.Task[None] | None = None
        self.port = 0
        #: Frontends restarted after dying (for tests and logs).
        self.restarts = 0

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._processes]

    async def start(self) -> int:
        """Start the frontends; returns the port they listen on once every one listens."""
        settings = self._settings
        self._reserved = reserve_port(settings.host, settings.grpc_port)
        self.port = int(self._reserved.getsockname()[1])
        self._directory = Path(tempfile.mkdtemp(prefix="peregrine-engine-"))
        path = self._directory / "engine.sock"
        self._unix = await asyncio.start_unix_server(self._accept, str(path), limit=self._limit)
        self._processes = [self._spawn(path) for _ in range(self._count)]
        try:
            await asyncio.wait_for(self._all_ready.wait(), START_TIMEOUT_S)
        except TimeoutError:
            await self.stop(0.0)
            raise OSError(f"the frontends did not listen on port {self.port} within "
                          f"{START_TIMEOUT_S:g} s (see their log lines)") from None
        self._watcher = asyncio.get_running_loop().create_task(self._watch(path))
        return self.port

    def _spawn(self, path: Path) -> subprocess.Popen[bytes]:
        settings = settings_json(self._with_port())
        return subprocess.Popen(
            [sys.executable, "-m", "server.multiproc.frontend", "--engine", str(path),
             "--settings", settings])

    def _with_port(self) -> ServerSettings:
        return dataclasses.replace(self._settings, grpc_port=self.port)

    def _frontend_ready(self) -> None:
        self._ready += 1
        if self._ready >= self._count:
            self._all_ready.set()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        link = EngineLink(self._table, reader, writer, self._limit, self._frontend_ready)
        task = asyncio.current_task()
        assert task is not None
        self._links.add(task)
        try:
            await link.serve()
        finally:
            self._links.discard(task)

    async def _watch(self, path: Path) -> None:
        while not self._stopping:
            await asyncio.sleep(WATCH_INTERVAL_S)
            for index, process in enumerate(self._processes):
                if self._stopping or process.poll() is None:
                    continue
                log.error("frontend process died: starting another",
                          extra={"pid": process.pid, "returncode": process.returncode})
                self.restarts += 1
                self._processes[index] = self._spawn(path)

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
        if self._unix is not None:
            self._unix.close()
        for task in list(self._links):
            task.cancel()
        await asyncio.gather(*self._links, return_exceptions=True)
        if self._reserved is not None:
            self._reserved.close()
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)
