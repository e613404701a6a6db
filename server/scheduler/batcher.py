"""The dynamic micro-batcher of one model version: the async driver around policy and queue."""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from server.errors import (
    BackendError,
    BoundExceeded,
    DeadlineExceeded,
    ExecutionTimedOut,
    InvalidInput,
    ModelNotReady,
    PeregrineError,
)
from server.interfaces import (
    Backend,
    BatchTracer,
    DeviceBackend,
    ModelMetrics,
    Packer,
    RequestBackend,
)
from server.parameters import Key, choice, integer, optional
from server.scheduler import policy
from server.scheduler.executor import BatchExecutor, BatchRun
from server.scheduler.instances import InstanceSet
from server.scheduler.queue import PendingRequest, RequestQueue
from server.spec import ModelSpec
from server.types import Array, InferRequest, InferResponse

log = logging.getLogger(__name__)
_now = time.perf_counter_ns

#: The longest a batch cancelled for its execution timeout has to return (it gets as long as
#: the timeout again, up to this) before its instance is quarantined.
MAX_CANCEL_GRACE_S = 5.0


@dataclass(slots=True, eq=False)
class _Running:
    """A batch handed to an instance's thread. ``abandoned`` once its requests were answered
    without it (execution timeout, unload): what it returns then is dropped."""

    instance: int
    entries: list[PendingRequest]
    start_ns: int
    timer: asyncio.TimerHandle | None = None
    abandoned: bool = False


class DynamicBatcher:
    """Queues requests for one model version, forms batches and hands each to an idle backend
    instance through the version's BatchExecutor.

    Everything but a slow backend call runs on the event loop thread, driven by callbacks, not
    tasks: a request costs one future, a batch one loop callback. A batch predicted to be cheap
    and small runs right in that callback (no thread hand-off); any other runs in its
    instance's own thread, so the loop never blocks on a model. A batch that overruns the
    execution timeout is answered DEADLINE_EXCEEDED and cancelled; an instance whose batch
    does not stop is quarantined (server/scheduler/instances.py).
    """

    def __init__(
        self,
        spec: ModelSpec,
        version: str,
        instances: Sequence[Backend],
        packer: Packer,
        metrics: ModelMetrics,
        execution_timeout_s: float = 30.0,
        max_queue_wait_s: float = 0.0,
        tracer: BatchTracer | None = None,
    ) -> None:
        """``execution_timeout_s``: the server's default (0: none), which a model's
        ``execution_timeout_ms`` overrides. A cancelled batch then has as long again (at
        most MAX_CANCEL_GRACE_S) to stop before its instance is quarantined.
        ``max_queue_wait_s``: the server's default (0: none) of the longest predicted wait a
        request is accepted with, which a model's ``max_queue_wait_ms`` overrides.
        ``tracer``: told of every batch when tracing is configured (None: nothing is)."""
        if not instances:
            raise ValueError("a batcher needs at least one backend instance")
        self._loop = asyncio.get_running_loop()
        self._spec = spec
        self._version = version
        timeout_ms = EXECUTION_TIMEOUT_MS.value(spec.parameters, spec.name)
        self._timeout_s = execution_timeout_s if timeout_ms is None else timeout_ms / 1000
        first = instances[0]
        #: The backend takes requests, not packed batches (a Python model's process).
        by_request = isinstance(first, RequestBackend)
        self._executor = BatchExecutor(spec, version, None if by_request else packer.for_model(
            spec, version, first.host_allocator if isinstance(first, DeviceBackend) else None))
        self._metrics = metrics
        self._tracer = tracer
        batching = spec.batching
        self._queue = RequestQueue(batching, spec.default_max_queue_size)
        wait_ms = MAX_QUEUE_WAIT_MS.value(spec.parameters, spec.name)
        wait_s = max_queue_wait_s if wait_ms is None else wait_ms / 1000
        self._queue_wait = (policy.QueueWait(int(wait_s * 1e9), spec.instance_count) if wait_s > 0
                      else None)
        self._batching = spec.batches and batching.enabled
        self._max_batch = spec.max_batch_size
        self._preferred = frozenset(batching.preferred_batch_sizes)
        self._max_delay_ns = batching.max_queue_delay_us * 1000
        self._adaptive_delay = QUEUE_DELAY.value(spec.parameters, spec.name) == ADAPTIVE
        inline_max_us = INLINE_EXECUTION_MAX_US.value(spec.parameters, spec.name)
        self._cost = policy.InlineCost(
            inline_max_ns=inline_max_us * 1000 if len(instances) == 1 and not by_request else 0
        )
        #: An input fed by image preprocessing: any image size batches with any other.
        self._size_free = spec.preprocess.input if spec.preprocess is not None else None
        #: Ragged inputs: any extents of their variable dims batch together (padded).
        self._ragged = frozenset(t.name for t in spec.inputs if t.ragged)
        self._instances = InstanceSet(instances, f"exec-{spec.name}-{version}", self._loop,
                                      self._quarantined,
                                      min(self._timeout_s or MAX_CANCEL_GRACE_S,
                                          MAX_CANCEL_GRACE_S))
        #: Batches in instance threads, not yet answered.
        self._runs: set[_Running] = set()
        self._accepting = True
        self._closed = False
        #: Why the batcher cannot serve; "" while it can.
        self._problem = ""
        #: Requests submitted so far, and how many of them the last look at the queue had seen:
        #: a difference means requests are still arriving (the adaptive queue delay).
        self._arrivals = 0
        self._arrivals_seen = 0
        #: A dispatch callback is queued on the loop (call_soon).
        self._scheduled = False
        self._timer: asyncio.TimerHandle | None = None
        #: Set by ``drain`` and resolved once nothing is queued or running.
        self._drained: asyncio.Future[None] | None = None
        metrics.count_pending(self._queue.__len__)

    # -- the Scheduler interface -------------------------------------------------------------

    def submit(self, request: InferRequest, lone: bool = False) -> asyncio.Future[InferResponse]:
        if not self._accepting or self._problem:
            raise ModelNotReady(
                f"model '{self._spec.name}' version {self._version} is not accepting requests"
            )
        level = self._level(request.priority)
        rows = self._rows(request)
        if self._queue_wait is not None and self._queue.rows:
            self._check_wait()
        now = _now()
        future: asyncio.Future[InferResponse] = self._loop.create_future()
        entry = PendingRequest(
            request=request,
            rows=rows,
            signature=self._signature(request),
            level=level,
            enqueue_ns=now,
            deadline_ns=self._deadline(request, level, now),
            future=future,
            extents=self._extents(request) if self._ragged and self._batching else None,
        )
        self._queue.push(entry)
        self._arrivals += 1
        future.add_done_callback(functools.partial(self._withdraw_if_cancelled, entry))
        if lone and len(self._queue) == 1 and self._instances.has_idle and not self._scheduled \
                and not self._closed:
            # A unary call finding the version idle: nothing it could wait for is on its way,
            # so it is dispatched now, not on the loop's next round (inline when cheap).
            self._arrivals_seen = self._arrivals
            self._dispatch()
        else:
            self._schedule()
        return future

    def _check_wait(self) -> None:
        assert self._queue_wait is not None
        predicted = self._queue_wait.predict_ns(self._queue.rows)
        if predicted > self._queue_wait.bound_ns:
            raise BoundExceeded(
                "max_queue_wait_ms",
                f"model '{self._spec.name}' version {self._version} would start this request "
                f"in about {predicted / 1e6:.0f} ms ({self._queue.rows} rows queued ahead); "
                f"the bound is {self._queue_wait.bound_ns / 1e6:g} ms (max_queue_wait_ms)")

    @property
    def executor(self) -> BatchExecutor:
        """The version's execution seam (tools time it without the queue)."""
        return self._executor

    @property
    def instances(self) -> Sequence[Backend]:
        return self._instances.backends

    async def run_rows(self, inputs: Mapping[str, Array], spans: Sequence[tuple[int, int]],
                       batch_size: int, deliver: Callable[[dict[str, Array]], None]) -> None:
        """Offline scoring (``peregrine batch``): each span [first, last) of the (validated)
        rows of ``inputs``, in order, as batches of ``batch_size`` on an idle instance's own
        thread, all in one hop (BatchExecutor.run_rows: the packing, preprocessing and
        backend call of ``submit`` without the queue, requests, a hop per batch, metrics or
        the execution timeout; a hop per batch costs about as much as a small batch runs).
        ``deliver`` gets each span's outputs on that thread, and may block; what it raises
        stops the run and is raised here. The instance is taken meanwhile, so the queue
        cannot use it. A failure of the model raises its typed error."""
        if not self._instances.has_idle:
            raise ModelNotReady(f"model '{self._spec.name}' version {self._version} has no "
                                "idle instance")
        instance = self._instances.take()
        backend = self._instances.backends[instance]
        run_rows = self._executor.run_rows

        def job() -> None:
            for first, last in spans:
                deliver(run_rows(backend, {name: value[first:last]
                                           for name, value in inputs.items()}, batch_size))

        try:
            await self._instances.run(instance, job)
        finally:
            self._instances.returned(instance)
            self._schedule()

    @property
    def healthy(self) -> bool:
        """False once the batcher failed, lost every instance or closed; the model then
        reports not ready."""
        return not self._problem

    @property
    def problem(self) -> str:
        return self._problem

    def inflight(self) -> int:
        return len(self._queue) + sum(len(run.entries) for run in self._runs)

    async def drain(self, timeout: float) -> bool:
        self._accepting = False
        if self._drained is None:
            self._drained = self._loop.create_future()
            self._check_idle()
        try:
            await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Answer what is queued or still running UNAVAILABLE (a drain had its time), cancel
        the running batches and close the instances; never waits for a batch to return."""
        if self._closed:
            return  # idempotent: instances are closed exactly once (the Backend contract)
        self._closed = True
        self._accepting = False
        self._problem = self._problem or "unloaded"
        self._cancel_timer()
        now = _now()
        unloaded = ModelNotReady(f"model '{self._spec.name}' was unloaded")
        for entry in self._queue.drain_all():
            self._fail(entry, unloaded, now)
        cut_off = ModelNotReady(
            f"model '{self._spec.name}' version {self._version} was unloaded before its "
            "batch finished")
        for run in list(self._runs):
            self._abandon(run, cut_off, now)
        busy = await self._instances.close()
        if busy:
            log.warning("model instances still in a batch at unload: each is closed when its "
                        "batch returns (a stuck one never; its thread is left to the exit)",
                        extra={"model": self._spec.name, "version": self._version,
                               "instances": busy})

    # -- request bookkeeping -------------------------------------------------------------------

    def _level(self, priority: int) -> int:
        levels = self._spec.batching.priority_levels
        if priority and not levels:
            # A model without priority levels treats every request alike (as Triton does).
            return 1
        if priority > levels:
            raise InvalidInput(
                f"priority {priority} is out of range: model '{self._spec.name}' "
                f"has {levels} priority levels"
            )
        return self._queue.level_for(priority)

    def _rows(self, request: InferRequest) -> int:
        if not self._spec.batches:
            return 1
        for value in request.inputs.values():
            return int(value.shape[0])
        return 1

    def _signature(self, request: InferRequest) -> tuple[Any, ...]:
        """Per-row shapes (the rank alone for ragged and preprocessed inputs): requests batch
        together only when these match."""
        if not self._batching:
            return ()
        free = self._size_free
        ragged = self._ragged
        return tuple((name, value.shape[1:] if name != free and name not in ragged
                      else value.ndim)
                     for name, value in request.inputs.items())

    def _extents(self, request: InferRequest) -> policy.Extents:
        """Its ragged inputs' dims after the batch dim, in the order of its inputs (the same
        for every request of one signature)."""
        ragged = self._ragged
        return tuple(value.shape[1:] for name, value in request.inputs.items()
                     if name in ragged)

    def _deadline(self, request: InferRequest, level: int, now: int) -> int | None:
        timeout_us = self._spec.batching.queue_policy(level).timeout_us
        if request.timeout_us and (not timeout_us or request.timeout_us < timeout_us):
            # A request may shorten the model's timeout, never extend it.
            timeout_us = request.timeout_us
        deadline = now + timeout_us * 1000 if timeout_us else None
        if request.deadline_ns is not None and (deadline is None or request.deadline_ns < deadline):
            deadline = request.deadline_ns
        return deadline

    def _withdraw_if_cancelled(
        self, entry: PendingRequest, future: asyncio.Future[InferResponse]
    ) -> None:
        """A cancelled call leaves the queue at once (one that is executing is counted when
        its batch finishes)."""
        if future.cancelled() and entry.queued:
            self._queue.remove(entry)
            self._metrics.request_failed("CANCELED", _now() - entry.enqueue_ns)
            self._check_idle()

    def _check_idle(self) -> None:
        drained = self._drained
        if drained is not None and not self.inflight() and not drained.done():
            drained.set_result(None)

    # -- dispatch --------------------------------------------------------------------------------

    def _schedule(self) -> None:
        """Look at the queue on the loop's next round, once, if an instance could take work.

        Requests submitted before that round (a burst the loop delivered together) are all
        in the queue by then. What is queued now counts as seen: that look holds the batch
        for another round only if more requests arrived in between (a lone request goes on
        the first look, not the second).
        """
        if self._scheduled or not self._instances.has_idle or self._closed:
            return
        self._scheduled = True
        self._arrivals_seen = self._arrivals
        self._loop.call_soon(self._dispatch)

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _dispatch(self) -> None:
        self._scheduled = False
        self._cancel_timer()
        if self._closed:
            return
        try:
            self._dispatch_ready()
        except Exception as exc:  # a bug here must not strand the waiters
            self._fail_batcher(f"batcher failed: {exc!r}")

    def _dispatch_ready(self) -> None:
        while self._instances.has_idle and len(self._queue):
            now = _now()
            for entry in self._queue.remove_expired(now):
                self._expire(entry, now)
            oldest = self._queue.oldest()
            if oldest is None:
                break
            arriving = self._arrivals != self._arrivals_seen
            self._arrivals_seen = self._arrivals
            decision = policy.decide(
                ((e.rows, e.signature, e.extents) for e in self._queue.front()),
                oldest_enqueue_ns=oldest.enqueue_ns,
                now_ns=now,
                batching=self._batching,
                max_batch_size=self._max_batch,
                preferred_sizes=self._preferred,
                max_delay_ns=self._max_delay_ns,
                arriving=arriving or not self._adaptive_delay,
            )
            if not decision.take:
                if decision.wait_until_ns is not None:
                    self._wait(decision.wait_until_ns - now)
                break
            self._start(self._queue.pop(decision.take), now)
        self._check_idle()

    def _wait(self, remaining_ns: int) -> None:
        """Hold the batch. Adaptive: look again after the loop's next I/O poll, since requests
        are still arriving. Fixed: until the delay ends; timers are whole milliseconds
        (uvloop's resolution), rounded up so they fire once, late by under 1 ms, where a
        shorter one would fire early and spin."""
        if self._adaptive_delay:
            self._scheduled = True
            self._loop.call_soon(self._dispatch)
        else:
            delay_s = math.ceil(remaining_ns / 1_000_000) / 1000
            self._timer = self._loop.call_later(delay_s, self._dispatch)

    def _expire(self, entry: PendingRequest, now: int) -> None:
        self._fail(entry, DeadlineExceeded(
            f"request '{entry.request.id}' to model '{self._spec.name}' timed out "
            f"after {(now - entry.enqueue_ns) / 1e6:.3f} ms in the queue"
        ), now)

    def _fail(self, entry: PendingRequest, exc: PeregrineError, now: int) -> None:
        """Answer ``entry`` with ``exc`` and count the failure (once: a future already done,
        cancelled by its caller say, is counted where that happened)."""
        if entry.future.done():
            return
        self._metrics.request_failed(exc.reason, now - entry.enqueue_ns)
        entry.future.set_exception(exc)

    def _start(self, entries: list[PendingRequest], start: int) -> None:
        instance = self._instances.take()
        rows = [e.rows for e in entries]
        requests = [e.request for e in entries]
        backend = self._instances.backends[instance]
        if self._cost.runs_inline(sum(rows), lambda: _input_bytes(requests)):
            run = self._executor.run(backend, requests, rows)
            self._instances.returned(instance)
            self._finish(entries, start, run)
            return
        running = _Running(instance, entries, start)
        self._runs.add(running)
        future = self._instances.run(
            instance, functools.partial(self._executor.run, backend, requests, rows))
        future.add_done_callback(functools.partial(self._finished_in_thread, running))
        if self._timeout_s:
            running.timer = self._loop.call_later(self._timeout_s, self._timed_out, running)

    def _finished_in_thread(self, running: _Running, future: asyncio.Future[BatchRun]) -> None:
        self._instances.returned(running.instance)
        if running.abandoned:
            self._schedule()
            return  # answered already (execution timeout, unload)
        if running.timer is not None:
            running.timer.cancel()
        self._runs.discard(running)
        if (error := future.exception()) is not None:  # the worker never cancels its futures
            run = BatchRun(error=error if isinstance(error, Exception)
                           else BackendError(repr(error)))
        else:
            run = future.result()
        self._finish(running.entries, running.start_ns, run)
        self._schedule()

    def _timed_out(self, running: _Running) -> None:
        """The batch overran the execution timeout: answer its requests, tell the model to
        stop (the instance is quarantined unless it returns within the grace period)."""
        seconds = self._timeout_s
        log.warning("batch cancelled: execution timeout", extra={
            "model": self._spec.name, "version": self._version, "instance": running.instance,
            "timeout_s": seconds, "requests": len(running.entries),
        })
        self._abandon(running, ExecutionTimedOut(
            f"model '{self._spec.name}' version {self._version} did not finish the batch "
            f"within its execution timeout of {seconds:g} s; the run was cancelled"), _now())
        self._instances.cancel(running.instance)
        self._check_idle()

    def _abandon(self, running: _Running, error: PeregrineError, now: int) -> None:
        """Answer a running batch's requests with ``error`` without waiting for it."""
        running.abandoned = True
        if running.timer is not None:
            running.timer.cancel()
        self._runs.discard(running)
        for entry in running.entries:
            self._fail(entry, error, now)

    def _quarantined(self, instance: int) -> None:
        grace = self._instances.grace_s
        log.error("model instance quarantined: its cancelled batch did not stop", extra={
            "model": self._spec.name, "version": self._version, "instance": instance,
            "grace_s": grace, "instances_left": self._instances.available,
        })
        if not self._instances.available:
            self._fail_batcher(
                f"every instance is quarantined: a batch overran the execution timeout of "
                f"{self._timeout_s:g} s and did not stop within {grace:g} s of being "
                "cancelled; load the model again")

    def _finish(self, entries: list[PendingRequest], start: int, run: BatchRun) -> None:
        for execution in run.executions:
            self._cost.observe(execution.rows, execution.cpu_ns)
        now = _now()
        if self._queue_wait is not None:
            self._queue_wait.observe(sum(e.rows for e in entries), now - start)
        executor = self._executor
        answered: list[int] = []
        if run.error is not None:
            error = executor.typed_error(run.error, [e.request for e in entries])
            for entry in entries:
                self._fail(entry, error, now)
        else:
            for entry, outcome in zip(entries, run.outcomes, strict=True):
                future = entry.future
                if future.done():
                    self._metrics.request_failed("CANCELED", now - entry.enqueue_ns)
                elif isinstance(outcome, Exception):
                    self._fail(entry, executor.typed_error(outcome, [entry.request]), now)
                else:
                    future.set_result(outcome)
                    answered.append(entry.enqueue_ns)
        self._metrics.batch_done(start, now, [e.enqueue_ns for e in entries], answered,
                                 run.executions)
        if self._tracer is not None:
            self._tracer.batch_done(entries, start, now, run.executions)
        self._check_idle()

    def _fail_batcher(self, problem: str) -> None:
        """The batcher cannot serve any more: the model reports not ready, saying why, and
        what is queued is answered UNAVAILABLE."""
        self._problem = problem
        self._metrics.unavailable()
        log.critical("model not ready: batcher stopped",
                     extra={"model": self._spec.name, "version": self._version,
                            "reason": problem})
        error = ModelNotReady(f"model '{self._spec.name}' version {self._version} is not "
                              f"ready: {problem}")
        now = _now()
        for entry in self._queue.drain_all():
            self._fail(entry, error, now)
        self._check_idle()


#: Hold a batch only while requests keep arriving (up to the delay): one request at a time
#: never waits. The default.
ADAPTIVE = "adaptive"
#: Hold every batch below its preferred size for the whole delay, as Triton does.
FIXED = "fixed"
QUEUE_DELAY = Key("queue_delay", choice(ADAPTIVE, FIXED, case_sensitive=True),
                  "how max_queue_delay_microseconds is spent: adaptive or fixed", ADAPTIVE)
INLINE_EXECUTION_MAX_US = Key(
    "inline_execution_max_us", integer(0),
    "batches predicted to take less run on the event loop thread (one instance only); 0: off",
    "100")
EXECUTION_TIMEOUT_MS = Key(
    "execution_timeout_ms", optional(integer(0)),
    "a batch running longer is cancelled and answered DEADLINE_EXCEEDED; 0: no limit; "
    "unset: the server's --execution-timeout-secs")
MAX_QUEUE_WAIT_MS = Key(
    "max_queue_wait_ms", optional(integer(0)),
    "a request whose predicted wait in the queue (rows queued ahead x the measured time per "
    "row) is longer is refused RESOURCE_EXHAUSTED at once; 0: no limit; unset: the server's "
    "--max-queue-wait-ms")
#: config.pbtxt ``parameters`` keys the batcher owns.
PARAMETER_KEYS = (QUEUE_DELAY, INLINE_EXECUTION_MAX_US, EXECUTION_TIMEOUT_MS, MAX_QUEUE_WAIT_MS)


def _input_bytes(requests: Sequence[InferRequest]) -> int:
    """The batch's input bytes, for the inline bound (BYTES elements at their length)."""
    total = 0
    for request in requests:
        for value in request.inputs.values():
            total += value.nbytes if value.dtype.kind != "O" else sum(map(len, value.flat))
    return total
