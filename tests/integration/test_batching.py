"""Dynamic batching, admission, deadlines, priorities and nv_* metrics through a real gRPC server
and tritonclient (asyncio client for concurrency, the blocking one for single calls).

Every test uses a model of its own in one shared server, so statistics never mix.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.server_harness import ServerThread

# A lost waiter shows up as a hang: fail it quickly instead of at the global timeout.
pytestmark = pytest.mark.timeout(30)

SLOW_MS = 100.0
#: Models whose tests queue requests behind one running batch: the batch must outlast the
#: clients' sends by a wide margin on a loaded 2-core machine.
BUSY_MS = 400.0
TIMED_MS = 200.0
DELAY_US = 600_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("batching_repo")
    model_factory.add_sub_model(repo, "mixed", max_batch_size=8)
    model_factory.slow_model(repo, "slow", delay_ms=SLOW_MS, max_batch_size=8)
    model_factory.add_sub_model(repo, "delayed", max_batch_size=8,
                                max_queue_delay_microseconds=DELAY_US, preferred_batch_size=[4],
                                queue_delay="fixed")
    model_factory.add_sub_model(repo, "adaptive", max_batch_size=8,
                                max_queue_delay_microseconds=DELAY_US, preferred_batch_size=[4])
    model_factory.slow_model(repo, "bounded", delay_ms=BUSY_MS, max_queue_size=2)
    model_factory.slow_model(repo, "timed", delay_ms=TIMED_MS)
    model_factory.slow_model(repo, "deadline", delay_ms=TIMED_MS)
    model_factory.slow_model(repo, "prio", delay_ms=BUSY_MS, max_batch_size=4,
                             priority_levels=2, default_priority_level=2)
    model_factory.slow_model(repo, "metered", delay_ms=BUSY_MS, max_queue_size=1)
    with ServerThread(repo) as running:
        yield running


@pytest.fixture
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


# -- helpers ------------------------------------------------------------------------------------


def add_sub_inputs(a: np.ndarray, b: np.ndarray) -> list[grpcclient.InferInput]:
    inputs = [grpcclient.InferInput("INPUT0", list(a.shape), "FP32"),
              grpcclient.InferInput("INPUT1", list(b.shape), "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    return inputs


def slow_input(rows: int = 1, seed: float = 0.0) -> tuple[list[grpcclient.InferInput],
                                                          np.ndarray]:
    x = np.arange(rows * model_factory.SLOW_WIDTH, dtype=np.float32).reshape(rows, -1) + seed
    tensor = grpcclient.InferInput("INPUT0", [rows, model_factory.SLOW_WIDTH], "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor], x


def status(exc: InferenceServerException) -> str:
    return str(exc.status())


def state(server: ServerThread, model: str) -> tuple[int, int, int]:
    """(requests in flight, queued, batches executed), read atomically on the server's loop."""
    assert server.server is not None
    served = server.server.repository.catalog.get(model, "1")

    async def read() -> tuple[int, int, int]:
        return (served.scheduler.inflight(), served.metrics.stats.pending,
                served.metrics.stats.execution_count)

    result: tuple[int, int, int] = server.call(read())
    return result


async def until(server: ServerThread, model: str, predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate(*state(server, model)):
        if time.monotonic() > deadline:
            raise AssertionError(f"{model}: state {state(server, model)} never matched")
        await asyncio.sleep(0.002)


async def start_busy(
    aio: aioclient.InferenceServerClient, server: ServerThread, model: str
) -> asyncio.Task[Any]:
    """One request that is executing (not queued) when this returns."""
    inputs, _ = slow_input(1, seed=-1.0)
    task = asyncio.create_task(aio.infer(model, inputs))
    await until(server, model, lambda inflight, pending, _e: inflight == 1 and pending == 0)
    return task


def model_stats(client: grpcclient.InferenceServerClient, model: str) -> Any:
    response = client.get_inference_statistics(model, "1")
    (stats,) = response.model_stats
    return stats


# -- rows go back to their requests ---------------------------------------------------------------


async def test_concurrent_mixed_batch_sizes_each_get_their_own_rows(
    aio: aioclient.InferenceServerClient, client: grpcclient.InferenceServerClient
) -> None:
    sizes = [1, 4, 2, 8, 3, 1, 5, 2, 6, 1, 7, 3, 2, 4, 1, 8]
    cases = []
    for i, rows in enumerate(sizes):
        a = (np.arange(rows * 16, dtype=np.float32).reshape(rows, 16) + 1000.0 * i)
        b = np.full((rows, 16), float(i + 1), dtype=np.float32)
        cases.append((f"req-{i}", a, b))
    results = await asyncio.gather(
        *(aio.infer("mixed", add_sub_inputs(a, b), request_id=rid) for rid, a, b in cases)
    )
    for (rid, a, b), result in zip(cases, results, strict=True):
        assert result.get_response().id == rid
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
    stats = model_stats(client, "mixed")
    assert stats.inference_count == sum(sizes)
    assert stats.inference_stats.success.count == len(sizes)
    assert all(0 < b.batch_size <= 8 for b in stats.batch_stats)


async def test_batches_form_under_concurrency(
    aio: aioclient.InferenceServerClient, client: grpcclient.InferenceServerClient
) -> None:
    count = 12
    cases = [slow_input(1, seed=float(i)) for i in range(count)]
    results = await asyncio.gather(*(aio.infer("slow", inputs) for inputs, _ in cases))
    for (_, x), result in zip(cases, results, strict=True):
        expected = model_factory.slow_model_expected(x, SLOW_MS)
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), expected)
    stats = model_stats(client, "slow")
    assert stats.inference_count == count
    assert stats.execution_count < count
    sizes = [b.batch_size for b in stats.batch_stats]
    assert max(sizes) > 1, sizes
    # Every executed batch is accounted for in batch_stats.
    assert sum(b.compute_infer.count for b in stats.batch_stats) == stats.execution_count


async def test_fixed_max_queue_delay_batches_to_the_preferred_size(
    aio: aioclient.InferenceServerClient, client: grpcclient.InferenceServerClient
) -> None:
    one = np.ones((1, 16), dtype=np.float32)
    start = time.perf_counter()
    results = await asyncio.gather(
        *(aio.infer("delayed", add_sub_inputs(one * i, one)) for i in range(4))
    )
    # The preferred size completes the batch: it goes without waiting out the 0.6 s delay.
    elapsed = time.perf_counter() - start
    assert elapsed < 0.5 * DELAY_US / 1e6, f"a preferred-size batch took {elapsed:.3f}s"
    for i, result in enumerate(results):
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), one * i + one)
    stats = model_stats(client, "delayed")
    assert stats.execution_count == 1
    assert [b.batch_size for b in stats.batch_stats] == [4]
    # A lone request never reaches the preferred size: it goes once the delay ran out.
    start = time.perf_counter()
    result = await aio.infer("delayed", add_sub_inputs(one, one))
    waited = time.perf_counter() - start
    np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), np.zeros_like(one))
    assert waited >= 0.8 * DELAY_US / 1e6, f"lone request answered after {waited:.3f}s"
    stats = model_stats(client, "delayed")
    assert stats.execution_count == 2
    assert sorted(b.batch_size for b in stats.batch_stats) == [1, 4]


async def test_adaptive_max_queue_delay_never_holds_a_lone_request(
    aio: aioclient.InferenceServerClient, client: grpcclient.InferenceServerClient
) -> None:
    one = np.ones((1, 16), dtype=np.float32)
    for _ in range(3):
        start = time.perf_counter()
        result = await aio.infer("adaptive", add_sub_inputs(one, one))
        waited = time.perf_counter() - start
        np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), one + one)
        # One request at a time: nobody else is coming, so the 0.6 s delay is not spent.
        assert waited < 0.25 * DELAY_US / 1e6, f"lone request answered after {waited:.3f}s"
    stats = model_stats(client, "adaptive")
    assert stats.execution_count == 3
    assert [b.batch_size for b in stats.batch_stats] == [1]


# -- admission -------------------------------------------------------------------------------------


async def test_full_queue_answers_resource_exhausted(
    aio: aioclient.InferenceServerClient, server: ServerThread,
    client: grpcclient.InferenceServerClient,
) -> None:
    busy = await start_busy(aio, server, "bounded")
    queued = [asyncio.create_task(aio.infer("bounded", slow_input()[0])) for _ in range(2)]
    await until(server, "bounded", lambda _i, pending, _e: pending == 2)
    with pytest.raises(InferenceServerException) as caught:
        await aio.infer("bounded", slow_input()[0])
    assert status(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
    assert "full" in str(caught.value.message())
    await asyncio.gather(busy, *queued)
    stats = model_stats(client, "bounded")
    assert stats.inference_stats.success.count == 3
    assert stats.inference_stats.fail.count == 1
    assert stats.inference_count == 3


async def test_request_timeout_parameter_expires_in_the_queue(
    aio: aioclient.InferenceServerClient, server: ServerThread,
    client: grpcclient.InferenceServerClient,
) -> None:
    busy = await start_busy(aio, server, "timed")
    # tritonclient's `timeout` is the request parameter, in microseconds: 20 ms, while the
    # running batch takes about 200 ms.
    with pytest.raises(InferenceServerException) as caught:
        await aio.infer("timed", slow_input(3)[0], timeout=20_000)
    assert status(caught.value) == "StatusCode.DEADLINE_EXCEEDED"
    await busy
    stats = model_stats(client, "timed")
    assert stats.inference_count == 1  # the expired request never ran
    assert stats.execution_count == 1
    assert stats.inference_stats.fail.count == 1
    # A generous timeout on an idle model changes nothing.
    result = await aio.infer("timed", slow_input(2)[0], timeout=60_000_000)
    assert result.as_numpy("OUTPUT0").shape == (2, model_factory.SLOW_WIDTH)


async def test_client_deadline_exceeded_and_server_keeps_answering(
    aio: aioclient.InferenceServerClient, server: ServerThread,
    client: grpcclient.InferenceServerClient,
) -> None:
    busy = await start_busy(aio, server, "deadline")
    with pytest.raises(InferenceServerException) as caught:
        await aio.infer("deadline", slow_input(4)[0], client_timeout=0.05)
    assert status(caught.value) == "StatusCode.DEADLINE_EXCEEDED"
    # The abandoned call leaves the queue at once, while the first batch is still running.
    await until(server, "deadline",
                lambda inflight, pending, executed: (inflight, pending, executed) == (1, 0, 0))
    await busy
    result = await aio.infer("deadline", slow_input(2)[0])
    assert result.as_numpy("OUTPUT0").shape == (2, model_factory.SLOW_WIDTH)
    stats = model_stats(client, "deadline")
    assert stats.inference_count == 3  # 1 (busy) + 2; the four abandoned rows never ran
    assert stats.execution_count == 2
    assert stats.inference_stats.fail.count == 1
    samples = scrape(server)
    labels = {"model": "deadline", "version": "1"}
    assert value(samples, "nv_inference_request_failure", reason="CANCELED", **labels) == 1
    assert client.is_server_ready()


async def test_priority_parameter_is_honoured(
    aio: aioclient.InferenceServerClient, server: ServerThread
) -> None:
    busy = await start_busy(aio, server, "prio")
    finished: list[str] = []

    async def infer(name: str, priority: int) -> None:
        # Three rows with max_batch_size 4: one request per batch, so the order shows.
        await aio.infer("prio", slow_input(3)[0], priority=priority, request_id=name)
        finished.append(name)

    lows = [asyncio.create_task(infer("low-a", 2)), asyncio.create_task(infer("low-b", 0))]
    await until(server, "prio", lambda _i, pending, _e: pending == 2)
    high = asyncio.create_task(infer("high", 1))
    await asyncio.gather(busy, *lows, high)
    assert finished == ["high", "low-a", "low-b"]


def test_priority_out_of_range_is_invalid_argument(
    client: grpcclient.InferenceServerClient,
) -> None:
    with pytest.raises(InferenceServerException) as caught:
        client.infer("prio", slow_input()[0], priority=3)
    assert status(caught.value) == "StatusCode.INVALID_ARGUMENT"


# -- metrics ---------------------------------------------------------------------------------------


def scrape(server: ServerThread) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode("utf-8")
    samples: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def value(samples: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str,
          **labels: str) -> float:
    key = (name, frozenset(labels.items()))
    assert key in samples, f"{name}{labels} is not exported"
    return samples[key]


async def test_metrics_match_model_statistics(
    aio: aioclient.InferenceServerClient, server: ServerThread,
    client: grpcclient.InferenceServerClient,
) -> None:
    model = {"model": "metered", "version": "1"}
    for rows in (1, 2, 3):
        await aio.infer("metered", slow_input(rows)[0])
    busy = await start_busy(aio, server, "metered")
    queued = asyncio.create_task(aio.infer("metered", slow_input(2)[0]))
    await until(server, "metered", lambda _i, pending, _e: pending == 1)
    # Refused first, while the queue is surely full (a scrape on a loaded machine can take
    # long enough for the running batch to end).
    with pytest.raises(InferenceServerException) as caught:
        await aio.infer("metered", slow_input()[0])
    assert status(caught.value) == "StatusCode.RESOURCE_EXHAUSTED"
    live = scrape(server)
    assert value(live, "nv_inference_pending_request_count", **model) == 1
    await asyncio.gather(busy, queued)

    samples = scrape(server)
    stats = model_stats(client, "metered")
    infer_stats = stats.inference_stats
    assert value(samples, "nv_inference_request_success", **model) == 5
    assert infer_stats.success.count == 5
    assert value(samples, "nv_inference_count", **model) == stats.inference_count == 9
    assert value(samples, "nv_inference_exec_count", **model) == stats.execution_count == 5
    assert value(samples, "nv_inference_queue_duration_us", **model) == infer_stats.queue.ns // 1000
    assert infer_stats.queue.count == 5
    assert value(samples, "nv_inference_request_duration_us", **model) == (
        (infer_stats.success.ns + infer_stats.fail.ns) // 1000
    )
    assert value(samples, "nv_inference_compute_infer_duration_us", **model) == (
        infer_stats.compute_infer.ns // 1000
    )
    assert value(samples, "nv_inference_compute_infer_duration_us", **model) > 0
    assert value(samples, "nv_inference_request_failure", reason="REJECTED", **model) == 1
    for reason in ("CANCELED", "BACKEND", "OTHER"):
        assert value(samples, "nv_inference_request_failure", reason=reason, **model) == 0
    assert infer_stats.fail.count == 1
    assert value(samples, "nv_inference_pending_request_count", **model) == 0

    # Our own histograms, with the same labels and counts that agree with the statistics.
    assert value(samples, "peregrine_request_duration_seconds_count", **model) == 5
    assert value(samples, "peregrine_queue_duration_seconds_count", **model) == 5
    assert value(samples, "peregrine_compute_duration_seconds_count", **model) == 5
    assert value(samples, "peregrine_batch_size_count", **model) == 5
    assert value(samples, "peregrine_batch_size_sum", **model) == 9
    assert value(samples, "peregrine_batch_size_bucket", le="+Inf", **model) == 5
    assert value(samples, "peregrine_model_ready", **model) == 1
    # Every loaded model version is labelled, not only the one used here.
    assert value(samples, "nv_inference_exec_count", model="mixed", version="1") >= 0

    # Process and platform collectors.
    names = {name for name, _ in samples}
    for name in ("process_cpu_seconds_total", "process_resident_memory_bytes",
                 "process_open_fds", "python_info"):
        assert name in names, f"{name} missing from /metrics"
