"""The thread of one backend instance: runs the batches the loop hands it, one at a time.

A daemon thread, not a ThreadPoolExecutor: concurrent.futures joins its threads when the
interpreter exits, so one run stuck in a model (an instance quarantined after its execution
timeout) would keep the process from ever exiting. A daemon thread stuck in native code is
left behind; the process exits around it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

from server.interfaces import Backend

log = logging.getLogger(__name__)
T = TypeVar("T")

#: A job: what to call, and the loop future that gets its outcome. None: close and exit.
_Job = tuple[Callable[[], Any], "asyncio.Future[Any]"] | None


class InstanceWorker:
    """Owns one backend instance's thread; the instance is closed on that thread, after the
    last batch it ran returned (never under a running batch)."""

    def __init__(self, backend: Backend, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self._backend = backend
        self._loop = loop
        self._jobs: queue.SimpleQueue[_Job] = queue.SimpleQueue()
        self._closed: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._serve, name=name, daemon=True)
        self._thread.start()

    def run(self, job: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``job`` on the thread; the future resolves on the loop with its outcome.
        Call on the loop thread."""
        future: asyncio.Future[T] = self._loop.create_future()
        self._jobs.put((job, future))
        return future

    def stop(self) -> asyncio.Future[None]:
        """Close the instance once the batch it runs (if any) has returned, and end the
        thread. The future resolves then; it never does while a run is stuck in the model."""
        self._jobs.put(None)
        return self._closed

    def _serve(self) -> None:
        while (job := self._jobs.get()) is not None:
            self._run(*job)
            # Drop the finished job now, not when the next one arrives: it holds the batch's
            # requests, whose inputs may view a client's shared-memory region.
            del job
        try:
            self._backend.close()
        except Exception as exc:  # the thread ends either way; say why the memory may stay
            log.error("backend instance failed to close", extra={"thread": self._thread.name,
                                                                 "error": repr(exc)})
        self._post(_succeed, self._closed, None)

    def _run(self, call: Callable[[], Any], future: asyncio.Future[Any]) -> None:
        try:
            result = call()
        except BaseException as exc:  # the loop decides what a failure means
            self._post(_fail, future, exc)
        else:
            self._post(_succeed, future, result)

    def _post(self, settle: Callable[[asyncio.Future[Any], Any], None],
              future: asyncio.Future[Any], value: Any) -> None:
        # RuntimeError: the loop has closed, and nobody waits for this outcome any more.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(settle, future, value)


def _succeed(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
