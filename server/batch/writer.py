"""The writer thread of ``peregrine batch``: scored chunks are handed over from any thread and
written in order, while the next chunks are scored.

At most ``depth`` chunks wait (``put`` blocks while they do): scoring never runs further
ahead of the database than that. The first write the database refuses stops the writer:
the chunks written before it stay (each chunk is one transaction), the ones waiting are
dropped, and every later ``put`` and ``close`` raises that refusal.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class WriterStopped(RuntimeError):
    """The writer was abandoned (the run stopped for another reason) before this chunk."""


class ChunkWriter(Generic[T]):
    def __init__(self, write: Callable[[T], None], depth: int) -> None:
        """``write(chunk)`` runs on the writer thread, one chunk at a time, in order."""
        self._write = write
        self._queue: queue.Queue[T | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._abandoned = False
        self._thread = threading.Thread(target=self._serve, name="batch-write", daemon=True)
        self._thread.start()

    def put(self, chunk: T) -> None:
        """Queue ``chunk`` for writing (any thread; blocks while ``depth`` chunks wait).
        Raises the writer's error once a write failed, WriterStopped once abandoned."""
        self._check()
        self._queue.put(chunk)

    def close(self) -> None:
        """Wait for every queued chunk to be written; raises the first refusal. Blocking."""
        self._queue.put(None)
        self._thread.join()
        self._check()

    def abandon(self) -> None:
        """Drop the chunks still waiting and end the thread after the write in progress
        (blocking until then): the run stops for another reason."""
        self._abandoned = True
        self._queue.put(None)
        self._thread.join()

    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._abandoned:
            raise WriterStopped("the run stopped")

    def _serve(self) -> None:
        # After a failure (or once abandoned) the queue is still drained up to the end mark,
        # so a put blocked on a full queue returns and sees the error.
        while (chunk := self._queue.get()) is not None:
            if self._error is not None or self._abandoned:
                continue
            try:
                self._write(chunk)
            except BaseException as exc:
                self._error = exc
