"""The backend instances of one model version: which may take a batch, and which never will.

An instance is idle, running a batch, cancelled (its batch overran the execution timeout and
was told to stop) or quarantined. A cancelled instance that returns within the grace period
is idle again; one that does not is quarantined for good: its thread is still inside the
model, so it never gets another batch and its memory is never freed under that run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TypeVar

from server.interfaces import Backend, CancellableBackend
from server.scheduler.worker import InstanceWorker

T = TypeVar("T")


class InstanceSet:
    """Lives on the event loop; takes no locks."""

    def __init__(
        self,
        backends: Sequence[Backend],
        thread_prefix: str,
        loop: asyncio.AbstractEventLoop,
        on_quarantine: Callable[[int], None],
        grace_s: float,
    ) -> None:
        """``grace_s``: how long a cancelled batch has to return; ``on_quarantine(index)`` is
        told of each instance taken out for good."""
        self.backends = tuple(backends)
        self._loop = loop
        self._workers = [InstanceWorker(b, f"{thread_prefix}-{i}", loop)
                         for i, b in enumerate(backends)]
        self._idle = list(range(len(backends)))
        #: Cancelled instances whose batch has not returned yet -> their grace timer.
        self._cancelled: dict[int, asyncio.TimerHandle] = {}
        self._quarantined: set[int] = set()
        self._on_quarantine = on_quarantine
        self.grace_s = grace_s
        self._closed = False

    @property
    def has_idle(self) -> bool:
        return bool(self._idle)

    @property
    def available(self) -> int:
        """Instances not quarantined."""
        return len(self.backends) - len(self._quarantined)

    def take(self) -> int:
        """An idle instance, now busy; call ``returned`` when its batch is back."""
        return self._idle.pop()

    def run(self, index: int, job: Callable[[], T]) -> asyncio.Future[T]:
        """Run ``job`` on the instance's own thread."""
        return self._workers[index].run(job)

    def returned(self, index: int) -> None:
        """The instance's batch came back (normally, or after ``cancel``)."""
        timer = self._cancelled.pop(index, None)
        if timer is not None:
            timer.cancel()
        if not self._closed and index not in self._quarantined:
            self._idle.append(index)

    def cancel(self, index: int) -> None:
        """Tell the instance's running batch to stop; quarantine the instance unless the
        batch returns within the grace period."""
        _cancel(self.backends[index])
        if not self._closed and index not in self._cancelled:
            self._cancelled[index] = self._loop.call_later(self.grace_s, self._quarantine,
                                                           index)

    def _quarantine(self, index: int) -> None:
        del self._cancelled[index]
        self._quarantined.add(index)
        self._on_quarantine(index)

    async def close(self) -> int:
        """Cancel the batches still running and end every instance's thread; returns once
        the idle instances are closed, with the number of busy ones. A busy one is closed on
        its thread when its batch returns, a stuck one never (its thread is a daemon: the
        process exits around it)."""
        self._closed = True
        for timer in self._cancelled.values():
            timer.cancel()
        self._cancelled.clear()
        idle = set(self._idle)
        self._idle.clear()
        waits = []
        for index, worker in enumerate(self._workers):
            if index not in idle:
                _cancel(self.backends[index])
            closed = worker.stop()
            if index in idle:
                waits.append(closed)
        await asyncio.gather(*waits)
        return len(self._workers) - len(idle)


def _cancel(backend: Backend) -> None:
    if isinstance(backend, CancellableBackend):
        backend.cancel()
