"""Generator processes: each runs its share of every step on its own event loop and channel.

Processes are started once per run (``spawn``: the parent holds gRPC channels, which must
not cross a fork) and kept for all steps. The parent sends a :class:`StepPlan` down a pipe
and gets back a result dict. Progress counters live in shared memory (two per process: ok,
errors), written by each process and read by the parent's progress line.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import traceback
from collections.abc import Sequence
from dataclasses import replace
from multiprocessing.sharedctypes import SynchronizedArray
from typing import Any

from bench.loadgen.loops import Generator, StepPlan, Target


def _event_loop_runner() -> asyncio.Runner:
    try:
        import uvloop
    except ImportError:
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


def _worker_main(
    index: int, target: Target, progress: Any, conn: multiprocessing.connection.Connection
) -> None:
    generator = Generator(target, progress, 2 * index)
    with _event_loop_runner() as runner:
        conn.send(("ready", None))
        while True:
            try:
                plan = conn.recv()
            except EOFError:  # the parent is gone
                return
            if plan is None:
                return
            try:
                conn.send(("ok", runner.run(generator.run(plan)).as_dict()))
            except Exception:
                conn.send(("error", traceback.format_exc()))


class WorkerError(RuntimeError):
    """A generator process failed; the message holds its traceback."""


class WorkerPool:
    def __init__(self, processes: int, target: Target) -> None:
        context = multiprocessing.get_context("spawn")
        self.progress: SynchronizedArray[int] = context.Array("q", 2 * processes, lock=False)
        self._conns: list[multiprocessing.connection.Connection] = []
        self._procs: list[multiprocessing.process.BaseProcess] = []
        for index in range(processes):
            parent_end, child_end = context.Pipe()
            proc = context.Process(
                target=_worker_main, args=(index, target, self.progress, child_end),
                name=f"bench-generator-{index}", daemon=True,
            )
            proc.start()
            child_end.close()
            self._conns.append(parent_end)
            self._procs.append(proc)
        try:
            self._receive()  # every process imported and set up: steps start on time
        except BaseException:
            self.close()
            raise

    @property
    def size(self) -> int:
        return len(self._procs)

    def counts(self) -> tuple[int, int]:
        """(ok, errors) measured so far in the current step, over all processes."""
        values = self.progress[:]
        return sum(values[0::2]), sum(values[1::2])

    def start(self, plans: Sequence[StepPlan]) -> None:
        for index in range(len(self.progress)):
            self.progress[index] = 0
        for conn, plan in zip(self._conns, plans, strict=True):
            conn.send(plan)

    def ready(self) -> bool:
        return all(conn.poll() for conn in self._conns)

    def results(self) -> list[dict[str, Any]]:
        return [payload for payload in self._receive() if payload is not None]

    def _receive(self) -> list[Any]:
        collected = []
        for index, conn in enumerate(self._conns):
            try:
                status, payload = conn.recv()
            except EOFError:
                self._procs[index].join(timeout=1)
                raise WorkerError(f"generator process {index} died "
                                  f"(exit code {self._procs[index].exitcode})") from None
            if status == "error":
                raise WorkerError(f"generator process {index} failed:\n{payload}")
            collected.append(payload)
        return collected

    def close(self) -> None:
        for conn in self._conns:
            with contextlib.suppress(BrokenPipeError, OSError):
                conn.send(None)
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.terminate()
                proc.join(timeout=5)
        for conn in self._conns:
            conn.close()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def split_plans(plan: StepPlan, processes: int) -> list[StepPlan]:
    """Share one step among ``processes``: in-flight requests, rate and request count.

    Open loop: each process offers rate/P with its arrivals offset by 1/rate from the
    previous one's, so constant arrivals interleave evenly; Poisson streams add up to a
    Poisson stream of the full rate.
    """
    def share(total: int, index: int) -> int:
        return total // processes + (1 if index < total % processes else 0)

    plans = []
    for index in range(processes):
        concurrency = (share(plan.concurrency, index) if plan.mode == "closed"
                       else max(1, plan.concurrency // processes))
        plans.append(replace(
            plan,
            concurrency=concurrency,
            rate=plan.rate / processes,
            phase_s=index / plan.rate if plan.rate > 0 else 0.0,
            requests=None if plan.requests is None else share(plan.requests, index),
            seed=plan.seed + index,
        ))
    return plans
