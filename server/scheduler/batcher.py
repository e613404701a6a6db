"""The dynamic micro-batcher of one model version: the async driver around policy and queue."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from server.errors import (
    BackendError,
    DeadlineExceeded,
    InvalidInput,
    ModelNotReady,
    PeregrineError,
)
from server.interfaces import Backend, Packer
from server.metrics import VersionMetrics
from server.scheduler import policy
from server.scheduler.queue import PendingRequest, RequestQueue
from server.spec import ModelSpec
from server.types import InferRequest, InferResponse, OutputTensor

log = logging.getLogger(__name__)
#: config.pbtxt parameter: batches predicted to take less than this many microseconds run on
#: the event loop thread (single-instance models only); 0 turns it off.
INLINE_PARAMETER = "inline_execution_max_us"
INLINE_DEFAULT_US = 100
_now = time.perf_counter_ns


class DynamicBatcher:
    """Queues requests for one model version and runs batches on its backend instances.

    Everything but the backend call runs on the event loop thread. One dispatcher task forms
    batches whenever an instance is free; each batch runs in the worker pool, one thread per
    instance, so the loop never blocks on a model.
    """

    def __init__(
        self,
        spec: ModelSpec,
        version: str,
        instances: Sequence[Backend],
        packer: Packer,
        metrics: VersionMetrics,
    ) -> None:
        if not instances:
            raise ValueError("a batcher needs at least one backend instance")
        self._spec = spec
        self._version = version
        self._instances = list(instances)
        self._idle = list(range(len(instances)))
        self._packer = packer.for_model(spec, version)
        self._metrics = metrics
        self._stats = metrics.stats
        self._pool = ThreadPoolExecutor(
            max_workers=len(instances), thread_name_prefix=f"exec-{spec.name}-{version}"
        )
        batching = spec.batching
        self._queue = RequestQueue(batching)
        self._batching = spec.batches and batching.enabled
        self._max_batch = spec.max_batch_size
        self._preferred = frozenset(batching.preferred_batch_sizes)
        self._max_delay_ns = batching.max_queue_delay_us * 1000
        self._arrivals = policy.ArrivalGap()
        self._cost = policy.InlineCost(
            inline_max_ns=_inline_max_us(spec) * 1000 if len(instances) == 1 else 0
        )
        self._all_outputs = tuple(t.name for t in spec.outputs)
        #: An input fed by image preprocessing: any image size batches with any other.
        self._size_free = spec.preprocess.input if spec.preprocess is not None else None
        self._running = 0
        self._accepting = True
        self._closed = False
        self._wake = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self._idle_event = asyncio.Event()
        self._idle_event.set()
        self._dispatcher = asyncio.get_running_loop().create_task(
            self._dispatch_forever(), name=f"batcher-{spec.name}-{version}"
        )
        self._dispatcher.add_done_callback(self._on_dispatcher_exit)
        self._failed: BaseException | None = None

    # -- the Scheduler interface -------------------------------------------------------------

    async def submit(self, request: InferRequest) -> InferResponse:
        if not self._accepting or self._failed is not None:
            raise ModelNotReady(
                f"model '{self._spec.name}' version {self._version} is not accepting requests"
            )
        level = self._level(request.priority)
        now = _now()
        entry = PendingRequest(
            request=request,
            rows=self._rows(request),
            signature=self._signature(request),
            level=level,
            enqueue_ns=now,
            deadline_ns=self._deadline(request, level, now),
            future=asyncio.get_running_loop().create_future(),
        )
        self._queue.push(entry)
        self._arrivals.arrived(now)
        self._stats.pending = len(self._queue)
        self._idle_event.clear()
        entry.future.add_done_callback(lambda _f: self._forget(entry))
        self._wake.set()
        return await entry.future

    @property
    def healthy(self) -> bool:
        """False once the dispatcher died; the model then reports not ready."""
        return self._failed is None and not self._dispatcher.done()

    def inflight(self) -> int:
        return len(self._queue) + self._running

    async def drain(self, timeout: float) -> bool:
        self._accepting = False
        try:
            await asyncio.wait_for(self._idle_event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def close(self) -> None:
        if self._closed:
            return  # idempotent: instances are closed exactly once (the Backend contract)
        self._closed = True
        self._accepting = False
        for entry in self._queue.drain_all():
            _fail(entry, ModelNotReady(f"model '{self._spec.name}' was unloaded"))
        self._stats.pending = 0
        self._dispatcher.cancel()
        await asyncio.gather(self._dispatcher, return_exceptions=True)
        # Joining the worker threads and freeing the sessions can block: keep it off the loop.
        await asyncio.to_thread(self._release)

    def _release(self) -> None:
        self._pool.shutdown(wait=True)
        for instance in self._instances:
            instance.close()

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
        """Per-row shapes: requests batch together only when these match."""
        if not self._batching:
            return ()
        free = self._size_free
        return tuple((name, value.shape[1:] if name != free else ())
                     for name, value in request.inputs.items())

    def _deadline(self, request: InferRequest, level: int, now: int) -> int | None:
        timeout_us = self._spec.batching.queue_policy(level).timeout_us
        if request.timeout_us and (not timeout_us or request.timeout_us < timeout_us):
            # A request may shorten the model's timeout, never extend it.
            timeout_us = request.timeout_us
        deadline = now + timeout_us * 1000 if timeout_us else None
        if request.deadline_ns is not None and (deadline is None or request.deadline_ns < deadline):
            deadline = request.deadline_ns
        return deadline

    def _forget(self, entry: PendingRequest) -> None:
        """A waiter finished or was cancelled: a cancelled call leaves the queue at once."""
        if entry.queued:
            self._queue.remove(entry)
            self._stats.pending = len(self._queue)
            self._check_idle()

    def _check_idle(self) -> None:
        if not self._running and not len(self._queue):
            self._idle_event.set()

    # -- the dispatcher --------------------------------------------------------------------------

    async def _dispatch_forever(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            self._dispatch_ready()

    def _dispatch_ready(self) -> None:
        while self._idle and len(self._queue):
            now = _now()
            for entry in self._queue.remove_expired(now):
                self._expire(entry, now)
            oldest = self._queue.oldest()
            if oldest is None:
                break
            decision = policy.decide(
                ((e.rows, e.signature) for e in self._queue.front()),
                oldest_enqueue_ns=oldest.enqueue_ns,
                now_ns=now,
                batching=self._batching,
                max_batch_size=self._max_batch,
                preferred_sizes=self._preferred,
                max_delay_ns=self._max_delay_ns,
                expected_gap_ns=self._arrivals.expected_ns,
            )
            if not decision.take:
                if decision.wait_until_ns is not None:
                    delay = max(0.0, (decision.wait_until_ns - now) / 1e9)
                    self._timer = asyncio.get_running_loop().call_later(delay, self._wake.set)
                break
            entries = self._queue.pop(decision.take)
            self._stats.pending = len(self._queue)
            instance = self._idle.pop()
            self._running += 1
            asyncio.get_running_loop().create_task(self._run_batch(instance, entries, now))
        self._check_idle()

    def _expire(self, entry: PendingRequest, now: int) -> None:
        self._stats.pending = len(self._queue)
        if entry.future.done():
            return
        entry.future.set_exception(
            DeadlineExceeded(
                f"request '{entry.request.id}' to model '{self._spec.name}' timed out "
                f"after {(now - entry.enqueue_ns) / 1e6:.3f} ms in the queue"
            )
        )

    async def _run_batch(self, instance: int, entries: list[PendingRequest], start: int) -> None:
        try:
            for entry in entries:
                waited = start - entry.enqueue_ns
                self._stats.queue.add(waited)
                self._metrics.queue_seconds.observe(waited / 1e9)
            try:
                await self._run_on(instance, entries)
            except InvalidInput as exc:
                if len(entries) == 1:
                    _fail_all(entries, exc)
                    return
                # The backend refused one request's data (BYTES that are not UTF-8, say): run
                # the batch's requests one by one so that only the offending ones fail.
                for entry in entries:
                    if entry.future.done():
                        continue
                    try:
                        await self._run_on(instance, [entry])
                    except Exception as alone:
                        _fail_all([entry], self._as_error(alone, [entry]))
            except Exception as exc:
                _fail_all(entries, self._as_error(exc, entries))
        finally:
            self._running -= 1
            self._idle.append(instance)
            self._wake.set()
            self._check_idle()

    async def _run_on(self, instance: int, entries: list[PendingRequest]) -> None:
        """Execute ``entries`` as one batch on ``instance`` and resolve their waiters."""
        rows = [e.rows for e in entries]
        requests = [e.request for e in entries]
        total_rows = sum(rows)
        if self._cost.runs_inline(total_rows):
            per_request, timings = self._execute(self._instances[instance], requests, rows)
        else:
            per_request, timings = await asyncio.get_running_loop().run_in_executor(
                self._pool, self._execute, self._instances[instance], requests, rows
            )
        input_ns, infer_ns, output_ns = timings
        self._cost.observe(total_rows, input_ns + infer_ns + output_ns)
        self._stats.record_batch(total_rows, len(entries), input_ns, infer_ns, output_ns)
        self._metrics.batch_size.observe(total_rows)
        self._metrics.compute_seconds.observe((input_ns + infer_ns + output_ns) / 1e9)
        for entry, outputs in zip(entries, per_request, strict=True):
            if not entry.future.done():
                entry.future.set_result(self._response(entry.request, outputs))

    def _as_error(self, exc: Exception, entries: list[PendingRequest]) -> PeregrineError:
        """Typed errors pass through; anything else the backend raised becomes BackendError."""
        if isinstance(exc, PeregrineError):
            return exc
        log.error(
            "backend failed",
            extra={"model": self._spec.name, "version": self._version,
                   "request_ids": ", ".join(repr(e.request.id) for e in entries),
                   "error": repr(exc)},
        )
        return BackendError(f"backend failed: {exc}")

    def _execute(
        self, backend: Backend, requests: list[InferRequest], rows: list[int]
    ) -> tuple[list[dict[str, OutputTensor]], tuple[int, int, int]]:
        """Pack, execute, unpack: in a worker thread, or inline when the batch is cheap."""
        t0 = _now()
        # The batch's buffers may be pooled: unpack (which copies) before the context exits.
        with self._packer.pack(requests, rows) as batch:
            t1 = _now()
            outputs = backend.execute(batch)
            t2 = _now()
            if self._spec.batches:
                produced = sum(rows)
                for name, value in outputs.items():
                    if value.ndim == 0 or value.shape[0] != produced:
                        raise BackendError(
                            f"output '{name}' has shape {list(value.shape)}; expected "
                            f"{produced} rows for the batch"
                        )
            per_request = self._packer.unpack(outputs, rows)
        t3 = _now()
        return per_request, (t1 - t0, t2 - t1, t3 - t2)

    def _response(self, request: InferRequest, outputs: dict[str, OutputTensor]) -> InferResponse:
        names = request.requested_outputs or self._all_outputs
        return InferResponse(
            model_name=self._spec.name,
            model_version=self._version,
            id=request.id,
            outputs=[outputs[n] for n in names],
        )

    def _on_dispatcher_exit(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        self._failed = exc
        log.critical(
            "batcher stopped",
            extra={"model": self._spec.name, "version": self._version, "error": repr(exc)},
        )
        error = ModelNotReady(f"model '{self._spec.name}' batcher failed: {exc!r}")
        for entry in self._queue.drain_all():
            _fail(entry, error)


def _inline_max_us(spec: ModelSpec) -> int:
    raw = spec.parameters.get(INLINE_PARAMETER, "")
    try:
        return int(raw) if raw else INLINE_DEFAULT_US
    except ValueError:
        log.warning("ignoring a non-integer parameter", extra={
            "model": spec.name, "parameter": INLINE_PARAMETER, "value": raw})
        return INLINE_DEFAULT_US


def _fail_all(entries: list[PendingRequest], exc: PeregrineError) -> None:
    for entry in entries:
        _fail(entry, exc)


def _fail(entry: PendingRequest, exc: PeregrineError) -> None:
    if not entry.future.done():
        entry.future.set_exception(exc)
