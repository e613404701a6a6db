"""Start a coroutine at once, and give it a task only if it has to wait.

The engine runs every call a frontend forwards as a coroutine. Most unary calls never wait:
a response-cache hit, a batch run inline on the loop, ModelReady. Python 3.12's eager tasks
do this; on 3.11 :func:`start_eagerly` runs the coroutine's first step right away, in a copy
of the current context as a task would, and only a coroutine still waiting after it goes on
in a task. That task takes the coroutine as it stands (:class:`_Started`), so it sees every
outcome exactly as in a task of its own: the awaited future's result or exception when it
resumes, and a cancellation of the task thrown in where it waits, even one that comes before
the task's first step.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Coroutine, Generator
from typing import Any

_REPLAYED = object()


def start_eagerly(coro: Coroutine[Any, Any, None]) -> asyncio.Task[None] | None:
    """Run ``coro`` until it first waits; None when it finished without waiting, else the
    task it goes on in. An exception it raises in that first step is raised here."""
    context = contextvars.copy_context()
    try:
        waiting = context.run(coro.send, None)
    except StopIteration:
        return None
    return asyncio.get_running_loop().create_task(_Started(coro, waiting), context=context)


class _Started(Coroutine[Any, Any, None]):
    """A coroutine whose first step has run, as its task takes it: the task's first ``send``
    gets what that step yielded (the future the coroutine waits on, still marked as waited
    on, or None for a bare yield); everything else goes to the coroutine itself."""

    __slots__ = ("_coro", "_first")

    def __init__(self, coro: Coroutine[Any, Any, None], first: Any) -> None:
        self._coro = coro
        self._first = first

    def send(self, value: Any) -> Any:
        first = self._first
        if first is not _REPLAYED:
            self._first = _REPLAYED
            return first
        return self._coro.send(value)

    def throw(self, *exc: Any) -> Any:
        self._first = _REPLAYED
        return self._coro.throw(*exc)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, None]:
        raise TypeError("a started coroutine runs in its task only")
