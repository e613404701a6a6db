"""server.scheduler.batcher.DynamicBatcher driven directly on asyncio, with real ONNX Runtime
instances loaded from models built by tests/model_factory.py.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from server.backends.onnxruntime import OnnxRuntimeFactory
from server.errors import BackendError, DeadlineExceeded, InvalidInput, ModelNotReady, Overloaded
from server.interfaces import Backend
from server.metrics import MetricsRegistry, VersionMetrics
from server.packing import default_packer
from server.repository.model_config import read_config, to_spec
from server.scheduler.batcher import DynamicBatcher
from server.scheduler.policy import INLINE_MAX_BYTES
from server.spec import BatchingSpec, InstanceSpec, ModelSpec, QueuePolicy, TensorSpec
from server.types import Array, DataType, InferRequest, InferResponse
from tests import model_factory

# A lost waiter shows up as a hang: fail it quickly instead of at the global timeout.
pytestmark = pytest.mark.timeout(30)

SLOW_MS = 100.0
_ids = itertools.count()


class Built:
    def __init__(self, batcher: DynamicBatcher, metrics: VersionMetrics, spec: ModelSpec) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.spec = spec


Maker = Callable[..., Awaitable[Built]]


def load_spec_and_instances(model_dir: Path) -> tuple[ModelSpec, list[Backend]]:
    factory = OnnxRuntimeFactory()
    spec = to_spec(read_config(model_dir), model_dir)
    version_dir = str(model_dir / "1")
    spec = factory.complete_spec(spec, version_dir)
    instances: list[Backend] = [
        factory.load(spec, version_dir, i) for i in range(spec.instance_count)
    ]
    return spec, instances


@pytest.fixture
async def make(tmp_path: Path) -> AsyncIterator[Maker]:
    """Build a model with a model_factory builder and wrap it in a DynamicBatcher."""
    built: list[DynamicBatcher] = []

    async def build(builder: Callable[..., Path], name: str, **kwargs: Any) -> Built:
        model_dir = builder(tmp_path, name, **kwargs)
        spec, instances = load_spec_and_instances(model_dir)
        metrics = MetricsRegistry().version(name, "1")
        batcher = DynamicBatcher(spec, "1", instances, default_packer, metrics)
        built.append(batcher)
        return Built(batcher, metrics, spec)

    yield build
    for batcher in built:
        await batcher.close()


def request(
    model: str, inputs: Mapping[str, Array], *, priority: int = 0, timeout_us: int = 0,
    deadline_ns: int | None = None, rid: str | None = None,
) -> InferRequest:
    return InferRequest(
        model_name=model,
        model_version="",
        id=rid if rid is not None else f"r{next(_ids)}",
        inputs=dict(inputs),
        input_types={name: DataType.FP32 for name in inputs},
        priority=priority,
        timeout_us=timeout_us,
        deadline_ns=deadline_ns,
    )


def slow_request(rows: int = 1, seed: float = 0.0, **kwargs: Any) -> InferRequest:
    x = (np.arange(rows * model_factory.SLOW_WIDTH, dtype=np.float32).reshape(rows, -1) + seed)
    return request("slow", {"INPUT0": x}, **kwargs)


def output(response: InferResponse, name: str = "OUTPUT0") -> Array:
    for tensor in response.outputs:
        if tensor.name == name:
            return tensor.data
    raise AssertionError(f"no output {name} in {[t.name for t in response.outputs]}")


async def until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Yield to the loop until ``condition`` holds (state, not time, decides)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.001)


async def start_busy(made: Built, rows: int = 1) -> asyncio.Task[InferResponse]:
    """Submit one request and return once it is executing (queue empty, one batch running)."""
    task = asyncio.ensure_future(made.batcher.submit(slow_request(rows, seed=-1.0)))
    await until(lambda: made.batcher.inflight() == 1 and made.metrics.stats.pending == 0)
    return task


# -- rows in, rows out -----------------------------------------------------------------------------


async def test_concurrent_mixed_batch_sizes_each_get_their_rows(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub", max_batch_size=8)
    sizes = [1, 3, 2, 8, 1, 4, 5, 2, 7, 1, 6, 3]
    requests = []
    for i, rows in enumerate(sizes):
        a = np.full((rows, 16), float(i), dtype=np.float32) + np.arange(16, dtype=np.float32)
        b = np.full((rows, 16), 1000.0 * (i + 1), dtype=np.float32)
        a[:, 0] += np.arange(rows, dtype=np.float32)  # rows differ within a request too
        requests.append((request("add_sub", {"INPUT0": a, "INPUT1": b}, rid=f"req-{i}"), a, b))
    responses = await asyncio.gather(*(made.batcher.submit(r) for r, _, _ in requests))
    for (req, a, b), response in zip(requests, responses, strict=True):
        assert response.id == req.id
        assert response.model_name == "add_sub" and response.model_version == "1"
        assert [t.name for t in response.outputs] == ["OUTPUT0", "OUTPUT1"]
        np.testing.assert_array_equal(output(response, "OUTPUT0"), a + b)
        np.testing.assert_array_equal(output(response, "OUTPUT1"), a - b)
        assert response.outputs[0].datatype is DataType.FP32
    stats = made.metrics.stats
    assert stats.inference_count == sum(sizes)
    assert stats.execution_count <= len(sizes)
    assert all(size <= 8 for size in stats.batches)
    assert made.batcher.inflight() == 0 and stats.pending == 0


async def test_requested_outputs_only(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub")
    a = np.ones((2, 16), dtype=np.float32)
    req = request("add_sub", {"INPUT0": a, "INPUT1": a})
    req.requested_outputs = ("OUTPUT1",)
    response = await made.batcher.submit(req)
    assert [t.name for t in response.outputs] == ["OUTPUT1"]
    np.testing.assert_array_equal(response.outputs[0].data, np.zeros((2, 16), np.float32))


async def test_shape_change_cuts_batches_and_rows_stay_with_their_request(make: Maker) -> None:
    made = await make(model_factory.identity_model, "identity", triton_dtype="FP32")
    widths = [3, 3, 5, 5, 3, 7]
    inputs = [np.arange(2 * w, dtype=np.float32).reshape(2, w) * (i + 1)
              for i, w in enumerate(widths)]
    responses = await asyncio.gather(
        *(made.batcher.submit(request("identity", {"INPUT0": x})) for x in inputs)
    )
    for x, response in zip(inputs, responses, strict=True):
        np.testing.assert_array_equal(output(response), x)
    assert made.metrics.stats.inference_count == 2 * len(widths)


async def test_non_batching_model_runs_each_request_alone(make: Maker) -> None:
    made = await make(model_factory.no_batch_model, "no_batch")
    xs = [np.full(4, float(i), dtype=np.float32) for i in range(5)]
    responses = await asyncio.gather(
        *(made.batcher.submit(request("no_batch", {"INPUT0": x})) for x in xs)
    )
    for x, response in zip(xs, responses, strict=True):
        np.testing.assert_array_equal(output(response), x * 2)
    assert made.metrics.stats.execution_count == 5
    assert made.metrics.stats.inference_count == 5


# -- batches form while one runs -------------------------------------------------------------------


async def test_requests_queued_during_a_batch_run_together_next(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS, max_batch_size=8)
    first = await start_busy(made)
    rows = [1, 2, 1, 3]
    inputs = [slow_request(r, seed=float(10 * i)) for i, r in enumerate(rows)]
    tasks = [asyncio.ensure_future(made.batcher.submit(r)) for r in inputs]
    await until(lambda: made.metrics.stats.pending == len(rows))
    # Still one batch in flight: nothing else could start on the only instance.
    assert made.metrics.stats.execution_count == 0
    assert made.batcher.inflight() == 1 + len(rows)
    responses = await asyncio.gather(first, *tasks)
    for req, response in zip(inputs, responses[1:], strict=True):
        expected = model_factory.slow_model_expected(req.inputs["INPUT0"], SLOW_MS)
        np.testing.assert_array_equal(output(response), expected)
    stats = made.metrics.stats
    assert stats.execution_count == 2
    assert stats.inference_count == 1 + sum(rows)
    assert sorted(stats.batches) == [1, sum(rows)]
    assert stats.batches[sum(rows)].compute_infer.count == 1
    # Queue time was recorded once per request.
    assert stats.queue.count == 1 + len(rows)


async def test_eager_dispatch_when_idle(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub")
    a = np.ones((1, 16), dtype=np.float32)
    await made.batcher.submit(request("add_sub", {"INPUT0": a, "INPUT1": a}))
    await made.batcher.submit(request("add_sub", {"INPUT0": a, "INPUT1": a}))
    # Sequential requests to an idle batcher without a delay never wait for company.
    assert made.metrics.stats.execution_count == 2
    assert sorted(made.metrics.stats.batches) == [1]


async def test_queue_delay_holds_until_the_preferred_size(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "delayed", max_queue_delay_microseconds=400_000,
                      preferred_batch_size=[4])
    a = np.ones((1, 16), dtype=np.float32)
    submit = made.batcher.submit
    start = time.perf_counter()
    responses = await asyncio.gather(
        *(submit(request("delayed", {"INPUT0": a * i, "INPUT1": a})) for i in range(4))
    )
    # Reaching the preferred size sends the batch without waiting out the delay.
    elapsed = time.perf_counter() - start
    assert elapsed < 0.2, f"a preferred-size batch took {elapsed:.3f}s of a 0.4 s delay"
    for i, response in enumerate(responses):
        np.testing.assert_array_equal(output(response), a * i + a)
    assert made.metrics.stats.execution_count == 1
    assert sorted(made.metrics.stats.batches) == [4]
    # Requests arriving together are held until a loop round brings no newcomer, then go as
    # one batch, long before the delay: nobody else is coming.
    start = time.perf_counter()
    await asyncio.gather(
        *(submit(request("delayed", {"INPUT0": a, "INPUT1": a})) for _ in range(3))
    )
    assert time.perf_counter() - start < 0.2
    assert sorted(made.metrics.stats.batches) == [3, 4]
    # A lone request does not wait for company that is not coming.
    start = time.perf_counter()
    await submit(request("delayed", {"INPUT0": a, "INPUT1": a}))
    assert time.perf_counter() - start < 0.2
    assert sorted(made.metrics.stats.batches) == [1, 3, 4]


async def test_fixed_queue_delay_holds_a_lone_request_for_the_delay(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "fixed", max_queue_delay_microseconds=400_000,
                      preferred_batch_size=[4], queue_delay="fixed")
    a = np.ones((1, 16), dtype=np.float32)
    # Triton's behaviour: a lone request waits for company for the configured delay, then
    # goes alone.
    start = time.perf_counter()
    await made.batcher.submit(request("fixed", {"INPUT0": a, "INPUT1": a}))
    waited = time.perf_counter() - start
    assert waited >= 0.3, f"a lone request went after {waited:.3f}s, before the 0.4 s delay"
    assert made.metrics.stats.execution_count == 1
    assert sorted(made.metrics.stats.batches) == [1]


# -- admission and deadlines -----------------------------------------------------------------------


async def test_max_queue_size_rejects_with_overloaded(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS, max_queue_size=2)
    first = await start_busy(made)
    queued = [asyncio.ensure_future(made.batcher.submit(slow_request())) for _ in range(2)]
    await until(lambda: made.metrics.stats.pending == 2)
    with pytest.raises(Overloaded):
        await made.batcher.submit(slow_request())
    # The running batch does not count against the queue bound, and rejection frees nothing.
    assert made.batcher.inflight() == 3
    await asyncio.gather(first, *queued)
    # Room again once the queue drained.
    await made.batcher.submit(slow_request())
    assert made.metrics.stats.inference_count == 4


async def test_request_timeout_expires_in_queue_and_never_runs(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made, rows=2)
    with pytest.raises(DeadlineExceeded) as caught:
        await made.batcher.submit(slow_request(rows=3, timeout_us=10_000))
    assert "timed out" in str(caught.value)
    await first
    stats = made.metrics.stats
    # The model saw only the first request's two rows.
    assert stats.inference_count == 2
    assert stats.execution_count == 1
    assert made.batcher.inflight() == 0 and stats.pending == 0


async def test_model_default_timeout_expires_queued_requests(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS,
                      default_timeout_microseconds=10_000)
    first = await start_busy(made)
    # A request may only shorten the model's timeout: asking for 10 s changes nothing.
    with pytest.raises(DeadlineExceeded):
        await made.batcher.submit(slow_request(timeout_us=10_000_000))
    await first
    assert made.metrics.stats.inference_count == 1


async def test_request_timeout_shortens_a_long_model_timeout(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS,
                      default_timeout_microseconds=30_000_000, allow_timeout_override=True)
    first = await start_busy(made)
    with pytest.raises(DeadlineExceeded):
        await made.batcher.submit(slow_request(timeout_us=10_000))
    # Without an own timeout the request waits out the running batch and succeeds.
    await made.batcher.submit(slow_request())
    await first
    assert made.metrics.stats.inference_count == 2


async def test_grpc_deadline_expires_queued_request(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made)
    deadline = time.perf_counter_ns() + 10_000_000
    with pytest.raises(DeadlineExceeded):
        await made.batcher.submit(slow_request(deadline_ns=deadline))
    await first
    assert made.metrics.stats.inference_count == 1


async def test_cancelled_submit_leaves_the_queue(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made)
    doomed = asyncio.ensure_future(made.batcher.submit(slow_request(rows=4)))
    kept = asyncio.ensure_future(made.batcher.submit(slow_request(rows=1)))
    await until(lambda: made.batcher.inflight() == 3)
    doomed.cancel()
    await until(lambda: made.batcher.inflight() == 2)
    assert made.metrics.stats.pending == 1
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.gather(first, kept)
    stats = made.metrics.stats
    # The cancelled request's four rows never reached the model.
    assert stats.inference_count == 2
    assert sorted(stats.batches) == [1]
    assert stats.failures_by_reason == {"CANCELED": 1} and stats.success.count == 2


async def test_each_outcome_is_counted_once_by_the_batcher(make: Maker) -> None:
    """Answered requests count as successes (with their queue times) and a request cancelled
    while its batch executes as one CANCELED failure, when the batch finishes."""
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    running = asyncio.ensure_future(made.batcher.submit(slow_request()))
    await until(lambda: made.batcher.inflight() == 1 and made.metrics.stats.pending == 0)
    running.cancel()
    answered = await made.batcher.submit(slow_request())
    assert answered.outputs
    stats = made.metrics.stats
    assert stats.failures_by_reason == {"CANCELED": 1} and stats.fail.count == 1
    assert stats.success.count == 1 and stats.queue.count == 2
    assert stats.inference_count == 2  # the cancelled one had already reached the model
    assert sum(made.metrics.request_seconds.counts) == 1


async def test_high_priority_queued_last_runs_first(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS, max_batch_size=4,
                      priority_levels=2, default_priority_level=2)
    first = await start_busy(made)
    finished: list[str] = []

    async def submit(name: str, priority: int) -> None:
        await made.batcher.submit(slow_request(rows=3, priority=priority, rid=name))
        finished.append(name)

    # Three rows each with max 4: one request per batch, so the order is visible.
    tasks = [asyncio.create_task(submit("low-a", 2)), asyncio.create_task(submit("low-b", 0))]
    await until(lambda: made.metrics.stats.pending == 2)
    tasks.append(asyncio.create_task(submit("high", 1)))
    await asyncio.gather(first, *tasks)
    assert finished == ["high", "low-a", "low-b"]
    assert made.metrics.stats.execution_count == 4


async def test_priority_out_of_range_is_invalid_input(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub", priority_levels=2,
                      default_priority_level=1)
    a = np.ones((1, 16), dtype=np.float32)
    with pytest.raises(InvalidInput):
        await made.batcher.submit(request("add_sub", {"INPUT0": a, "INPUT1": a}, priority=3))
    response = await made.batcher.submit(
        request("add_sub", {"INPUT0": a, "INPUT1": a}, priority=2)
    )
    np.testing.assert_array_equal(output(response), a + a)


async def test_priority_without_levels_is_ignored(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub")
    a = np.ones((1, 16), dtype=np.float32)
    response = await made.batcher.submit(
        request("add_sub", {"INPUT0": a, "INPUT1": a}, priority=7)
    )
    np.testing.assert_array_equal(output(response), a + a)


# -- drain and close -------------------------------------------------------------------------------


async def test_drain_waits_for_accepted_work_then_refuses_new(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made)
    queued = asyncio.ensure_future(made.batcher.submit(slow_request(rows=2)))
    await until(lambda: made.batcher.inflight() == 2)
    assert await made.batcher.drain(10.0) is True
    # Everything accepted before the drain finished, and finished successfully.
    assert first.done() and queued.done()
    await asyncio.gather(first, queued)
    assert made.batcher.inflight() == 0
    assert made.metrics.stats.inference_count == 3
    with pytest.raises(ModelNotReady):
        await made.batcher.submit(slow_request())


async def test_drain_times_out_while_work_remains(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made)
    assert await made.batcher.drain(0.001) is False
    await first
    assert await made.batcher.drain(5.0) is True


async def test_drain_of_an_idle_batcher_returns_at_once(make: Maker) -> None:
    made = await make(model_factory.add_sub_model, "add_sub")
    assert await made.batcher.drain(0.5) is True


async def test_close_answers_queued_and_running_requests_unavailable(make: Maker) -> None:
    made = await make(model_factory.slow_model, "slow", delay_ms=SLOW_MS)
    first = await start_busy(made)
    queued = [asyncio.ensure_future(made.batcher.submit(slow_request())) for _ in range(3)]
    await until(lambda: made.metrics.stats.pending == 3)
    await made.batcher.close()
    results = await asyncio.gather(first, *queued, return_exceptions=True)
    assert all(isinstance(r, ModelNotReady) for r in results), results
    assert "before its batch finished" in str(results[0])
    assert made.metrics.stats.pending == 0
    assert made.batcher.inflight() == 0
    assert not made.batcher.healthy
    assert made.batcher.problem == "unloaded"
    with pytest.raises(ModelNotReady):
        await made.batcher.submit(slow_request())


# -- backend failures ------------------------------------------------------------------------------


class FlakyBackend:
    """An identity backend whose chosen calls raise (or return a wrong number of rows)."""

    def __init__(self, fail_calls: set[int], wrong_rows_calls: frozenset[int] = frozenset(),
                 delay_s: float = 0.0, no_output_calls: frozenset[int] = frozenset()) -> None:
        self.calls = 0
        self.fail_calls = fail_calls
        self.wrong_rows_calls = wrong_rows_calls
        self.no_output_calls = no_output_calls
        self.delay_s = delay_s
        self.batches: list[int] = []
        self.closed = 0

    @property
    def description(self) -> str:
        return "flaky test double"

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        pass

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.calls += 1
        call = self.calls
        x = inputs["INPUT0"]
        self.batches.append(int(x.shape[0]))
        if self.delay_s:
            time.sleep(self.delay_s)
        if call in self.fail_calls:
            raise RuntimeError(f"boom on call {call}")
        if call in self.wrong_rows_calls:
            return {"OUTPUT0": x[:-1]}
        if call in self.no_output_calls:
            return {}
        return {"OUTPUT0": x.copy()}

    def close(self) -> None:
        self.closed += 1


def flaky_spec() -> ModelSpec:
    tensor = TensorSpec("INPUT0", DataType.FP32, (-1,))
    return ModelSpec(
        name="flaky", platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=8,
        inputs=(tensor,), outputs=(TensorSpec("OUTPUT0", DataType.FP32, (-1,)),),
        batching=BatchingSpec(enabled=True, default_queue_policy=QueuePolicy()),
        instances=(InstanceSpec(kind="CPU", count=1),),
    )


async def flaky_batcher(backend: FlakyBackend) -> tuple[DynamicBatcher, VersionMetrics]:
    metrics = MetricsRegistry().version("flaky", "1")
    return DynamicBatcher(flaky_spec(), "1", [backend], default_packer, metrics), metrics


async def _check_failure_case(backend: FlakyBackend, error_text: str) -> None:
    batcher, metrics = await flaky_batcher(backend)
    try:
        first = asyncio.ensure_future(batcher.submit(request("flaky", {"INPUT0": np.ones((1, 3))
                                                            .astype(np.float32)})))
        await until(lambda: batcher.inflight() == 1 and metrics.stats.pending == 0)
        xs = [np.full((i + 1, 3), float(i), dtype=np.float32) for i in range(3)]
        doomed = [asyncio.ensure_future(batcher.submit(request("flaky", {"INPUT0": x})))
                  for x in xs]
        await until(lambda: metrics.stats.pending == 3)
        await first
        results = await asyncio.gather(*doomed, return_exceptions=True)
        # Every waiter of the failed batch got the failure, and it was one batch of 6 rows.
        assert all(isinstance(r, BackendError) for r in results), results
        assert all(error_text in str(r) for r in results), results
        assert len({str(r) for r in results}) == 1  # one batch, one correlation id
        assert not any("boom" in str(r) for r in results), results
        assert backend.batches[:2] == [1, 6]
        # The batcher keeps serving.
        assert batcher.healthy
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        response = await batcher.submit(request("flaky", {"INPUT0": x}))
        np.testing.assert_array_equal(output(response), x)
        assert metrics.stats.execution_count == 2
        assert metrics.stats.inference_count == 3
        assert batcher.inflight() == 0
    finally:
        await batcher.close()


async def test_backend_exception_fans_out_to_every_waiter(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The waiters see which version failed and a correlation id, never the backend's own
    message; the log line with that id has it."""
    await _check_failure_case(FlakyBackend(fail_calls={2}, delay_s=0.1),
                              "model 'flaky' version 1 failed to run the batch (correlation id ")
    [record] = [r for r in caplog.records if r.getMessage() == "backend failed"]
    assert "boom on call 2" in record.error  # type: ignore[attr-defined]
    assert record.correlation_id  # type: ignore[attr-defined]


async def test_wrong_output_rows_fan_out_backend_error() -> None:
    await _check_failure_case(FlakyBackend(fail_calls=set(), wrong_rows_calls=frozenset({2}),
                                         delay_s=0.1),
                            "expected 6 rows")


async def test_a_missing_output_fails_its_requests_and_the_batcher_serves_on() -> None:
    backend = FlakyBackend(fail_calls=set(), no_output_calls=frozenset({1}))
    batcher, _metrics = await flaky_batcher(backend)
    try:
        x = np.ones((1, 3), dtype=np.float32)
        with pytest.raises(BackendError, match="no output 'OUTPUT0'"):
            await batcher.submit(request("flaky", {"INPUT0": x}))
        assert batcher.healthy
        response = await batcher.submit(request("flaky", {"INPUT0": x}))
        np.testing.assert_array_equal(output(response), x)
    finally:
        await batcher.close()


async def test_close_twice_closes_each_instance_once() -> None:
    backend = FlakyBackend(fail_calls=set())
    batcher, _metrics = await flaky_batcher(backend)
    x = np.ones((1, 3), dtype=np.float32)
    await batcher.submit(request("flaky", {"INPUT0": x}))
    await batcher.close()
    await batcher.close()
    assert backend.closed == 1


# -- execution timeouts, quarantine, closing around stuck runs -------------------------------------


class BlockingBackend(FlakyBackend):
    """An identity backend whose ``execute`` blocks until released; ``stops_on_cancel``: a
    cancel releases the run it interrupts (as onnxruntime's terminate does), else the run
    ignores it (one long kernel). Records the thread each call ran on."""

    def __init__(self, stops_on_cancel: bool = False) -> None:
        super().__init__(fail_calls=set())
        self.release = threading.Event()
        self.blocking = True
        self.stops_on_cancel = stops_on_cancel
        self.cancels = 0
        self.finished = 0
        self.threads: list[str] = []

    def cancel(self) -> None:
        self.cancels += 1
        if self.stops_on_cancel:
            self.release.set()

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        self.threads.append(threading.current_thread().name)
        if self.blocking:
            self.release.wait(30)
            self.release.clear()
        try:
            return super().execute(inputs)
        finally:
            self.finished += 1


def blocking_batcher(backends: list[BlockingBackend], **parameters: str) -> tuple[
        DynamicBatcher, VersionMetrics]:
    spec = dataclasses.replace(flaky_spec(), parameters=parameters,
                               instances=(InstanceSpec(kind="CPU", count=len(backends)),))
    metrics = MetricsRegistry().version("flaky", "1")
    batcher = DynamicBatcher(spec, "1", list(backends), default_packer, metrics,
                             execution_timeout_s=0.2)
    return batcher, metrics


def ones(rows: int = 1, width: int = 3) -> InferRequest:
    return request("flaky", {"INPUT0": np.ones((rows, width), dtype=np.float32)})


async def test_an_overrunning_onnxruntime_run_is_cancelled_and_its_instance_serves_on(
    make: Maker,
) -> None:
    made = await make(model_factory.loop_model, "loop",
                      parameters={"execution_timeout_ms": "300"})
    x = np.arange(model_factory.SLOW_WIDTH, dtype=np.float32).reshape(1, -1)

    def loop_request(trips: int) -> InferRequest:
        return InferRequest(
            model_name="loop", model_version="", id=f"r{next(_ids)}",
            inputs={"INPUT0": x, "TRIPS": np.array([trips], dtype=np.int64)},
            input_types={"INPUT0": DataType.FP32, "TRIPS": DataType.INT64})

    started = time.monotonic()
    with pytest.raises(DeadlineExceeded) as caught:
        await made.batcher.submit(loop_request(10**12))  # days of work
    assert "model 'loop' version 1" in str(caught.value)
    assert "execution timeout of 0.3 s" in str(caught.value)
    assert made.metrics.stats.failures_by_reason["BACKEND"] == 1
    # onnxruntime honoured the terminate flag: the instance is back, and serves.
    response = await made.batcher.submit(loop_request(5))
    assert time.monotonic() - started < 5  # the endless run stopped; it did not go on
    np.testing.assert_array_equal(output(response), model_factory.loop_model_expected(x, 5))
    assert made.batcher.healthy


async def test_a_run_that_ignores_cancel_quarantines_its_instance_for_good() -> None:
    stuck, spare = BlockingBackend(), BlockingBackend()
    spare.blocking = False
    batcher, metrics = blocking_batcher([spare, stuck])  # the last instance is taken first
    try:
        with pytest.raises(DeadlineExceeded, match="model 'flaky' version 1 did not finish"):
            await batcher.submit(ones())
        assert stuck.cancels == 1 and len(stuck.threads) == 1
        await until(lambda: batcher._instances.available == 1)
        assert batcher.healthy  # one instance is left
        for _ in range(5):
            await batcher.submit(ones())
        # Nothing more went to the quarantined instance, even once its run came back.
        stuck.release.set()
        await until(lambda: stuck.finished == 1)
        await asyncio.sleep(0.05)  # the loop hears that the run returned
        for _ in range(3):
            await batcher.submit(ones())
        assert len(stuck.threads) == 1 and spare.calls == 8
        assert metrics.stats.failures_by_reason["BACKEND"] == 1
    finally:
        stuck.release.set()
        await batcher.close()


async def test_a_model_with_every_instance_quarantined_is_not_ready() -> None:
    backend = BlockingBackend()
    batcher, _metrics = blocking_batcher([backend])
    try:
        running = asyncio.ensure_future(batcher.submit(ones()))
        queued = asyncio.ensure_future(batcher.submit(ones(1, width=4)))  # not batched with it
        with pytest.raises(DeadlineExceeded):
            await running
        assert batcher.healthy  # within the grace period the run may still come back
        with pytest.raises(ModelNotReady, match="every instance is quarantined"):
            await queued
        assert not batcher.healthy
        assert "every instance is quarantined" in batcher.problem
        assert "execution timeout of 0.2 s" in batcher.problem
        with pytest.raises(ModelNotReady):
            batcher.submit(ones())
        assert len(backend.threads) == 1
    finally:
        backend.release.set()
        await batcher.close()


async def test_a_cancelled_run_that_stops_in_time_gives_its_instance_back() -> None:
    backend = BlockingBackend(stops_on_cancel=True)
    batcher, _metrics = blocking_batcher([backend])
    try:
        with pytest.raises(DeadlineExceeded):
            await batcher.submit(ones())
        backend.blocking = False
        response = await batcher.submit(ones())
        np.testing.assert_array_equal(output(response), np.ones((1, 3), dtype=np.float32))
        await asyncio.sleep(0.3)  # past the grace period: nothing quarantines it late
        assert batcher.healthy and batcher._instances.available == 1
    finally:
        await batcher.close()


async def test_close_never_waits_for_a_stuck_run_and_closes_its_instance_after() -> None:
    backend = BlockingBackend()
    batcher, _metrics = blocking_batcher([backend], execution_timeout_ms="0")
    running = asyncio.ensure_future(batcher.submit(ones()))
    await until(lambda: len(backend.threads) == 1)
    await asyncio.wait_for(batcher.close(), 5)
    with pytest.raises(ModelNotReady, match="unloaded before its batch finished"):
        await running
    assert backend.cancels == 1
    assert backend.closed == 0  # never under a running batch
    backend.release.set()
    await until(lambda: backend.closed == 1)


async def test_no_execution_timeout_lets_a_long_batch_finish() -> None:
    backend = BlockingBackend()
    batcher, _metrics = blocking_batcher([backend], execution_timeout_ms="0")
    try:
        running = asyncio.ensure_future(batcher.submit(ones()))
        await asyncio.sleep(0.5)  # beyond the server default the batcher was given
        assert not running.done() and backend.cancels == 0
        backend.release.set()
        await running
    finally:
        await batcher.close()


async def test_a_big_request_after_tiny_ones_runs_in_the_instance_thread() -> None:
    backend = BlockingBackend()
    backend.blocking = False
    # However loaded the machine, a tiny batch is predicted well under this.
    batcher, _metrics = blocking_batcher([backend], inline_execution_max_us="100000")
    try:
        for _ in range(10):
            await batcher.submit(ones())
        loop_thread = threading.current_thread().name
        assert backend.threads[-1] == loop_thread  # cheap and small: run inline
        await batcher.submit(ones(1, width=INLINE_MAX_BYTES // 4 + 1))
        assert backend.threads[-1].startswith("exec-flaky-1")
        await batcher.submit(ones())
        assert backend.threads[-1] == loop_thread
    finally:
        await batcher.close()
