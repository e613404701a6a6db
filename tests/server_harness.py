"""A real Peregrine server on a free loopback port, run in a background thread.

The server gets its own event loop (uvloop) in its own thread, so tests can drive it with
blocking clients (tritonclient.grpc) or with their own asyncio clients. With
PEREGRINE_FRONTENDS set (as tests/integration/test_reruns.py sets it for a rerun
of the integration suite), the thread is the engine and that many frontend processes take
the calls, unless a test names its own ``frontends``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import threading
import urllib.request
from pathlib import Path
from typing import Any

import uvloop
from prometheus_client.parser import text_string_to_metric_families

from server.app import PeregrineServer
from server.settings import ServerSettings

#: This is one of the integration suite's reruns (the pure-Python codec and packer,
#: or frontend processes: tests/integration/test_reruns.py), not its first run.
RERUN = os.environ.get("PEREGRINE_NATIVE") == "0" \
    or int(os.environ.get("PEREGRINE_FRONTENDS", "1")) > 1


class ServerThread:
    def __init__(self, repository: Path, start_timeout_s: float = 60.0,
                 **overrides: Any) -> None:
        """``start_timeout_s``: how long the models may take to load (TensorRT engine builds
        take minutes)."""
        self._start_timeout_s = start_timeout_s
        overrides.setdefault("frontends", int(os.environ.get("PEREGRINE_FRONTENDS", "1")))
        overrides.setdefault("http_port", 0)
        settings = ServerSettings(
            model_repository=repository, grpc_port=0, metrics_port=0, **overrides
        )
        self.settings = settings
        self.server: PeregrineServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="peregrine-test-server",
                                        daemon=True)

    def _run(self) -> None:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(self._main())

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        try:
            self.server = PeregrineServer(self.settings)
            await self.server.start()
        except BaseException as exc:
            self._error = exc
            self._started.set()
            raise
        self._started.set()
        await self._stop.wait()
        await self.server.stop(grace=5.0)

    def start(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(timeout=self._start_timeout_s):
            raise TimeoutError(f"server did not start within {self._start_timeout_s:g} s")
        if self._error is not None:
            raise RuntimeError(f"server failed to start: {self._error!r}") from self._error
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stop is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=30)

    def call(self, coro: Any, timeout: float = 30) -> Any:
        """Run a coroutine on the server's loop (to poke at internals) and return its result."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.grpc_port}"

    @property
    def http_url(self) -> str:
        """host:port of the HTTP/REST server (with allow_http)."""
        assert self.server is not None and self.server.http_port
        return f"127.0.0.1:{self.server.http_port}"

    def metric(self, name: str, **labels: str) -> float | None:
        """The value of one sample on /metrics (its name, and exactly these labels); None
        when the series is not exported."""
        with urllib.request.urlopen(self.metrics_url, timeout=10) as response:
            text = response.read().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and sample.labels == labels:
                    return float(sample.value)
        return None

    @property
    def metrics_url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.metrics_port}/metrics"

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def with_settings(settings: ServerSettings, **changes: Any) -> ServerSettings:
    return dataclasses.replace(settings, **changes)
