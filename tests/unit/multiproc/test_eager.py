"""server.multiproc.eager: a coroutine started at once gets a task only if it waits, and then
sees every outcome as it would in a task of its own."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import pytest

from server.multiproc.eager import start_eagerly

VAR: contextvars.ContextVar[str] = contextvars.ContextVar("eager_test", default="unset")


def run(main: Any) -> Any:
    return asyncio.run(main())


def test_a_coroutine_that_never_waits_finishes_at_once_without_a_task() -> None:
    seen: list[str] = []

    async def quick() -> None:
        seen.append("ran")

    async def main() -> None:
        assert start_eagerly(quick()) is None
        assert seen == ["ran"]  # before anything else ran on the loop

    run(main)


def test_a_coroutine_that_waits_goes_on_in_a_task_with_each_result() -> None:
    seen: list[object] = []

    async def waits(first: asyncio.Future[int], second: asyncio.Future[int]) -> None:
        seen.append(await first)
        try:
            await second
        except ValueError as exc:
            seen.append(str(exc))
        await asyncio.sleep(0)  # a bare yield
        seen.append("done")

    async def main() -> None:
        loop = asyncio.get_running_loop()
        first, second = loop.create_future(), loop.create_future()
        task = start_eagerly(waits(first, second))
        assert task is not None and seen == []
        first.set_result(7)
        await asyncio.sleep(0)
        second.set_exception(ValueError("refused"))
        await task
        assert seen == [7, "refused", "done"]

    run(main)


@pytest.mark.parametrize("future_done", [False, True], ids=["waiting", "future-done"])
def test_cancelling_the_task_cancels_the_coroutine_where_it_waits(future_done: bool) -> None:
    seen: list[str] = []

    async def waits(future: asyncio.Future[int]) -> None:
        try:
            await future
            seen.append("resumed")
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            seen.append("cancelled")
            raise

    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        task = start_eagerly(waits(future))
        assert task is not None
        if future_done:
            # The future is done but the task has not resumed the coroutine yet: the
            # cancellation must still reach the coroutine, as a task's would.
            future.set_result(1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert seen[-1] == "cancelled"

    run(main)


def test_a_context_variable_the_coroutine_sets_stays_in_its_own_context() -> None:
    async def sets(future: asyncio.Future[None]) -> None:
        VAR.set("call")
        await future
        assert VAR.get() == "call"

    async def main() -> None:
        future = asyncio.get_running_loop().create_future()
        task = start_eagerly(sets(future))
        assert VAR.get() == "unset"
        future.set_result(None)
        assert task is not None
        await task

    run(main)


def test_an_exception_of_the_first_step_is_raised_to_the_caller() -> None:
    async def fails() -> None:
        raise RuntimeError("at once")

    async def main() -> None:
        with pytest.raises(RuntimeError, match="at once"):
            start_eagerly(fails())

    run(main)
