"""The response cache end to end (issue 22): a real server on loopback, real ONNX Runtime,
tritonclient. Hits and misses counted exactly (ModelStatistics and Triton's nv_cache_*
families), answers identical to computed ones for every datatype, the size bound under a
stream of distinct requests, hot swaps and reloads mid-stream, two clients racing on one
input, failures never stored, and no cache work for a model without the cache.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import numpy.typing as npt
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server._pb import grpc_service_pb2 as pb
from tests import model_factory, triton_shm
from tests.server_harness import ServerThread

StartServer = Callable[..., ServerThread]
WIDTH = model_factory.SCALED_WIDTH
CACHE = "local,size=1048576"


# -- helpers ----------------------------------------------------------------------------------


def statistics(client: grpcclient.InferenceServerClient, model: str,
               version: str = "1") -> Any:
    stats = client.get_inference_statistics(model, version).model_stats
    assert len(stats) == 1
    return stats[0]


def infer_fp32(client: grpcclient.InferenceServerClient, model: str, data: npt.NDArray[Any],
               request_id: str = "", output: str = "OUTPUT0") -> Any:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return client.infer(model, [tensor], request_id=request_id)


def rows(seed: int, count: int = 1, width: int = WIDTH) -> npt.NDArray[np.float32]:
    return np.random.default_rng(seed).standard_normal((count, width)).astype(np.float32)


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


# -- counting ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cached_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    """Every datatype's identity model with the cache, add_sub without it, a model whose
    every inference fails with it."""
    repo = tmp_path_factory.mktemp("cached")
    model_factory.identity_models(repo, response_cache=True)
    model_factory.add_sub_model(repo, "add_sub")
    model_factory.scaled_model_version(repo, "counted", 1, 2.0, with_config=True,
                                       response_cache=True)
    model_factory.failing_model(repo, "failing", response_cache=True)
    model_factory.add_sub_model(repo, "add_sub_cached", width=2, response_cache=True)
    model_factory.scaled_model_version(repo, "routed", 1, 1.0, with_config=True,
                                       response_cache=True, version_policy="all { }")
    model_factory.scaled_model_version(repo, "routed", 2, 2.0)
    with ServerThread(repo, cache_config=CACHE) as running:
        yield running


def test_hits_and_misses_are_counted_exactly(cached_server: ServerThread) -> None:
    inputs = [rows(seed) for seed in range(3)]
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        for round_ in range(3):
            for index, data in enumerate(inputs):
                request_id = f"r{round_}-{index}"
                result = infer_fp32(client, "counted", data, request_id)
                assert result.get_response().id == request_id  # a hit answers the new id
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 2.0)
        stats = statistics(client, "counted")
    inference = stats.inference_stats
    assert inference.cache_miss.count == 3
    assert inference.cache_hit.count == 6
    assert inference.cache_hit.ns > 0 and inference.cache_miss.ns > 0
    # As Triton counts them: a hit is a success and a queue entry, never an inference, an
    # execution or compute time.
    assert inference.success.count == 9
    assert inference.queue.count == 9
    assert stats.inference_count == 3 and stats.execution_count == 3
    assert inference.compute_infer.count == 3
    labels = {"model": "counted", "version": "1"}
    assert cached_server.metric("nv_cache_num_hits_per_model", **labels) == 6
    assert cached_server.metric("nv_cache_num_misses_per_model", **labels) == 3
    assert cached_server.metric("nv_cache_hit_duration_per_model", **labels) == \
        inference.cache_hit.ns // 1000
    assert cached_server.metric("nv_cache_miss_duration_per_model", **labels) == \
        inference.cache_miss.ns // 1000


def raw_request(dtype: str, seed: int) -> tuple[grpcclient.InferInput, npt.NDArray[Any]]:
    """A [2, 5] tensor of ``dtype`` and the array the identity model must return."""
    rng = np.random.default_rng(seed)
    if dtype == "BYTES":
        data = np.array([f"item {seed} {i} \u00e9".encode() * (i % 3) for i in range(10)],
                        dtype=np.object_).reshape(2, 5)
    elif dtype == "BF16":
        data = rng.integers(0, 2**16, (2, 5), dtype=np.uint16)
    elif dtype == "BOOL":
        data = rng.integers(0, 2, (2, 5)).astype(np.bool_)
    else:
        np_dtype = model_factory.NUMPY_DTYPE[dtype]
        data = rng.integers(0, 2**8 if np_dtype.itemsize == 1 else 2**15, (2, 5),
                            dtype=np.int64).astype(np_dtype)
    tensor = grpcclient.InferInput("INPUT0", [2, 5], dtype)
    if dtype == "BF16":  # tritonclient sends the upper halves of FP32 values
        tensor.set_data_from_numpy((data.astype(np.uint32) << 16).view(np.float32))
    else:
        tensor.set_data_from_numpy(data)
    return tensor, data


@pytest.mark.parametrize("dtype", model_factory.IDENTITY_DTYPES)
def test_a_hit_answers_exactly_what_was_computed_for_every_datatype(
    cached_server: ServerThread, dtype: str
) -> None:
    model = f"identity_{dtype.lower()}"
    tensor, data = raw_request(dtype, seed=7)
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        computed = client.infer(model, [tensor], request_id="first")
        cached = client.infer(model, [tensor], request_id="second")
        stats = statistics(client, model)
    assert stats.inference_stats.cache_miss.count == 1
    assert stats.inference_stats.cache_hit.count == 1
    assert stats.execution_count == 1
    first, second = computed.get_response(), cached.get_response()
    assert second.id == "second"
    assert second.outputs == first.outputs  # names, datatypes, shapes
    assert second.raw_output_contents == first.raw_output_contents
    if dtype == "BF16":
        answer = np.frombuffer(second.raw_output_contents[0], dtype=np.uint16).reshape(2, 5)
    else:
        answer = cached.as_numpy("OUTPUT0")
    np.testing.assert_array_equal(answer, data)


def test_a_request_twin_in_bytes_to_a_stored_one_but_invalid_is_refused_not_answered(
    cached_server: ServerThread
) -> None:
    """A hit is found before decoding; a request whose inputs hold the stored request's
    bytes split at another place, or which adds an invalid scheduling parameter, is still
    decoded and refused, never answered from the cache."""
    values = np.arange(4, dtype=np.float32).tobytes()

    def add_sub(first: bytes, second: bytes, priority: str = "") -> Any:
        request = pb.ModelInferRequest(model_name="add_sub_cached", id="twin")
        for name, data in (("INPUT0", first), ("INPUT1", second)):
            request.inputs.add(name=name, datatype="FP32", shape=[1, 2])
            request.raw_input_contents.append(data)
        if priority:
            request.parameters["priority"].string_param = priority
        with grpc.insecure_channel(cached_server.url) as channel:
            infer = channel.unary_unary(
                "/inference.GRPCInferenceService/ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString)
            return infer(request, timeout=20)

    for _ in range(2):  # a miss, then a hit
        answer = add_sub(values[:8], values[8:])
        assert answer.id == "twin"
        np.testing.assert_array_equal(
            np.frombuffer(answer.raw_output_contents[0], np.float32), [2.0, 4.0])
    for first, second, priority in ((values[:4], values[4:], ""),
                                    (values[:8], values[8:], "high")):
        with pytest.raises(grpc.RpcError) as refused:
            add_sub(first, second, priority)
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        stats = statistics(client, "add_sub_cached")
    # Refused while decoding: neither a hit nor a miss (nor a model failure).
    assert stats.inference_stats.cache_hit.count == 1
    assert stats.inference_stats.cache_miss.count == 1


def test_a_routing_table_set_after_answers_were_stored_steers_the_next_identical_request(
    cached_server: ServerThread
) -> None:
    """The latest version's answer is stored; once a table sends the model's traffic to
    version 1, the same request (naming no version) is routed, never answered with version
    2's stored answer."""
    data = rows(11)
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        for _ in range(2):
            np.testing.assert_array_equal(
                infer_fp32(client, "routed", data).as_numpy("OUTPUT0"), data * 2.0)
        with grpc.insecure_channel(cached_server.url) as channel:
            routes = admin_grpc.PeregrineAdminStub(channel)
            routes.SetRoute(admin.SetRouteRequest(table=admin.RouteTable(
                model="routed", variants=[admin.Variant(name="one", version="1", weight=100)])),
                timeout=10)
            try:
                for _ in range(2):
                    result = infer_fp32(client, "routed", data)
                    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), data * 1.0)
                    assert result.get_response().parameters["routing_variant"].string_param \
                        == "one"
            finally:
                routes.ClearRoute(admin.RouteRequest(model="routed"), timeout=10)
        assert statistics(client, "routed", "2").inference_stats.cache_hit.count == 1
        assert statistics(client, "routed", "1").inference_stats.cache_hit.count == 1


def test_a_message_past_the_entry_bound_is_refused_and_counted_before_any_lookup(
    cached_server: ServerThread
) -> None:
    """With a cache the request is parsed before the lookup: the entry bound still refuses
    it RESOURCE_EXHAUSTED and counts the refusal."""
    flood = (pb.ModelInferRequest(model_name="counted").SerializeToString()
             + b"\x2a\x00" * 70_000)  # empty inputs, past the 65,536 entries a message may hold
    before = cached_server.metric("peregrine_refused_total", bound="max_request_entries") or 0
    with grpc.insecure_channel(cached_server.url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        with pytest.raises(grpc.RpcError) as refused:
            infer(flood, timeout=20)
    assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert cached_server.metric("peregrine_refused_total",
                                bound="max_request_entries") == before + 1


def test_failed_requests_are_not_stored(cached_server: ServerThread) -> None:
    data = rows(1)
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        for _ in range(2):
            with pytest.raises(InferenceServerException):
                infer_fp32(client, "failing", data)
        stats = statistics(client, "failing")
    assert stats.inference_stats.cache_hit.count == 0
    assert stats.inference_stats.cache_miss.count == 2
    assert stats.inference_stats.fail.count == 2


def test_a_model_without_the_cache_does_no_cache_work(cached_server: ServerThread) -> None:
    server = cached_server.server
    assert server is not None and server.cache is not None
    # Structurally: the data plane checks this attribute and nothing else for the model.
    assert server.repository.catalog.get("add_sub", "").cache is None
    assert server.repository.catalog.get("counted", "").cache is not None
    store = server.cache.store
    before = len(store), store.used_bytes
    a, b = rows(3), rows(4)
    with grpcclient.InferenceServerClient(cached_server.url) as client:
        for _ in range(3):
            inputs = [grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32"),
                      grpcclient.InferInput("INPUT1", [1, WIDTH], "FP32")]
            inputs[0].set_data_from_numpy(a)
            inputs[1].set_data_from_numpy(b)
            result = client.infer("add_sub", inputs)
            np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
        stats = statistics(client, "add_sub")
    assert (len(store), store.used_bytes) == before
    assert stats.inference_stats.cache_hit.count == 0
    assert stats.inference_stats.cache_miss.count == 0
    assert stats.execution_count == 3
    assert cached_server.metric("nv_cache_num_hits_per_model",
                  model="add_sub", version="1") is None


def test_without_cache_config_a_model_asking_for_the_cache_runs_every_request(
    tmp_path: Path, start_server: StartServer
) -> None:
    model_factory.scaled_model_version(tmp_path, "asks", 1, 3.0, with_config=True,
                                       response_cache=True)
    server = start_server(tmp_path)
    assert server.server is not None and server.server.cache is None
    assert server.server.repository.catalog.get("asks", "").cache is None
    data = rows(5)
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(3):
            np.testing.assert_array_equal(
                infer_fp32(client, "asks", data).as_numpy("OUTPUT0"), data * 3.0)
        stats = statistics(client, "asks")
    assert stats.execution_count == 3
    assert stats.inference_stats.cache_miss.count == 0
    assert server.metric("peregrine_response_cache_entries") is None


def test_shared_memory_inputs_are_keyed_by_what_the_region_holds(
    tmp_path: Path, start_server: StartServer
) -> None:
    """The same region, offset and size with new contents is a new request; the answer of a
    hit is written to the output region like a computed one."""
    shm = triton_shm.load()
    model_factory.scaled_model_version(tmp_path, "shm", 1, 2.0, with_config=True,
                                       response_cache=True)
    server = start_server(tmp_path, cache_config=CACHE, allow_client_shm=True)
    size = WIDTH * 4
    key = f"/peregrine-cache-test-{threading.get_ident()}"
    inputs = shm.create_shared_memory_region("cache-in", key + "-in", size)
    outputs = shm.create_shared_memory_region("cache-out", key + "-out", size)
    try:
        with grpcclient.InferenceServerClient(server.url) as client:
            client.register_system_shared_memory("in", key + "-in", size)
            client.register_system_shared_memory("out", key + "-out", size)

            def infer(data: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
                shm.set_shared_memory_region(inputs, [data])
                shm.set_shared_memory_region(outputs, [np.zeros_like(data)])
                tensor = grpcclient.InferInput("INPUT0", [1, WIDTH], "FP32")
                tensor.set_shared_memory("in", size)
                output = grpcclient.InferRequestedOutput("OUTPUT0")
                output.set_shared_memory("out", size)
                client.infer("shm", [tensor], outputs=[output])
                return np.array(shm.get_contents_as_numpy(outputs, np.float32, [1, WIDTH]))

            first, second = rows(20), rows(21)
            for data in (first, first, second, first):
                np.testing.assert_array_equal(infer(data), data * 2.0)
            stats = statistics(client, "shm").inference_stats
            client.unregister_system_shared_memory()
    finally:
        shm.destroy_shared_memory_region(inputs)
        shm.destroy_shared_memory_region(outputs)
    assert (stats.cache_miss.count, stats.cache_hit.count) == (2, 2)


# -- the bound --------------------------------------------------------------------------------


def test_the_size_bound_holds_under_a_stream_of_distinct_requests(
    tmp_path: Path, start_server: StartServer
) -> None:
    width = 256  # 1 KiB of output per request
    model_factory.identity_model(tmp_path, "wide", "FP32", response_cache=True)
    capacity = 20_000
    server = start_server(tmp_path, cache_config=f"local,size={capacity}")
    sent = [rows(seed, width=width) for seed in range(60)]
    with grpcclient.InferenceServerClient(server.url) as client:
        for index, data in enumerate(sent):
            np.testing.assert_array_equal(
                infer_fp32(client, "wide", data).as_numpy("OUTPUT0"), data)
            if index % 10 == 9:
                used = server.metric("peregrine_response_cache_bytes")
                assert used is not None and 0 < used <= capacity
        entries = server.metric("peregrine_response_cache_entries")
        evictions = server.metric("peregrine_response_cache_evictions_total")
        assert entries is not None and evictions is not None
        assert 1 < entries < len(sent)
        assert entries + evictions == len(sent)
        # Least recently used first out: the newest answer is still there, the oldest not.
        misses = statistics(client, "wide").inference_stats.cache_miss.count
        infer_fp32(client, "wide", sent[-1])
        assert statistics(client, "wide").inference_stats.cache_hit.count == 1
        infer_fp32(client, "wide", sent[0])
        stats = statistics(client, "wide").inference_stats
        assert stats.cache_hit.count == 1 and stats.cache_miss.count == misses + 1
    assert server.metric("peregrine_response_cache_capacity_bytes") == capacity


# -- versions ---------------------------------------------------------------------------------


class StreamLoop:
    """One ModelStreamInfer call sending the same input again and again, one request at a
    time (the next goes when the previous is answered), recording (version, factor)."""

    def __init__(self, url: str, model: str, data: npt.NDArray[np.float32]) -> None:
        self.answers: list[tuple[str, float]] = []
        self.errors: list[str] = []
        self._data = data
        self._model = model
        self._client = grpcclient.InferenceServerClient(url)
        self._answered: queue.Queue[Any] = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._client.start_stream(callback=lambda result, error: self._answered.put(
            (result, error)))
        try:
            sequence = 0
            while not self._stop.is_set():
                tensor = grpcclient.InferInput("INPUT0", list(self._data.shape), "FP32")
                tensor.set_data_from_numpy(self._data)
                sequence += 1
                self._client.async_stream_infer(self._model, [tensor],
                                                request_id=str(sequence))
                result, error = self._answered.get(timeout=30)
                if error is not None:
                    self.errors.append(str(error))
                    continue
                response = result.get_response()
                assert response.id == str(sequence)
                factors = result.as_numpy("OUTPUT0") / self._data
                factor = float(factors.flat[0])
                if not np.allclose(factors, factor):
                    self.errors.append(f"mixed factors {factors}")
                self.answers.append((response.model_version, factor))
        finally:
            self._client.stop_stream()
            self._client.close()

    def __enter__(self) -> StreamLoop:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)

    def wait_for(self, count: int) -> None:
        target = len(self.answers) + count
        wait_until(lambda: len(self.answers) >= target or bool(self.errors), "answers")
        assert not self.errors, self.errors


def test_a_hot_swap_or_reload_mid_stream_never_serves_the_old_answers(
    tmp_path: Path, start_server: StartServer
) -> None:
    model_factory.scaled_model_version(tmp_path, "swapped", 1, 1.0, with_config=True,
                                       response_cache=True)
    server = start_server(tmp_path, model_control_mode="explicit", load_model=("swapped",),
                          state_file=tmp_path / "state.json", cache_config=CACHE)
    data = rows(11)
    with grpcclient.InferenceServerClient(server.url) as client, \
            StreamLoop(server.url, "swapped", data) as stream:
        stream.wait_for(20)
        # A new version swaps in while the stream keeps asking the same question.
        model_factory.scaled_model_version(tmp_path, "swapped", 2, 2.0)
        client.load_model("swapped")
        stream.wait_for(20)
        # The same version number reloaded with other weights: its cached answers are not
        # the new load's.
        model_factory.scaled_model_version(tmp_path, "swapped", 2, 3.0)
        client.load_model("swapped")
        stream.wait_for(20)
        hits = statistics(client, "swapped", "2").inference_stats.cache_hit.count
    answers = stream.answers
    assert {(version, factor) for version, factor in answers} == {
        ("1", 1.0), ("2", 2.0), ("2", 3.0)}
    # One request at a time: once a load has answered, no earlier load ever answers again.
    order = [(int(version), factor) for version, factor in answers]
    assert order == sorted(order)
    assert answers[-1] == ("2", 3.0)
    assert hits > 0
    assert server.server is not None and server.server.cache is not None
    # Version 1 and the first load of version 2 are gone, and their answers with them.
    wait_until(lambda: len(server.server.cache.store) == 1,  # type: ignore[union-attr]
               "the retired loads' entries to be dropped")


def test_unloading_a_model_drops_its_answers(tmp_path: Path, start_server: StartServer) -> None:
    model_factory.scaled_model_version(tmp_path, "dropped", 1, 2.0, with_config=True,
                                       response_cache=True)
    server = start_server(tmp_path, model_control_mode="explicit", load_model=("dropped",),
                          state_file=tmp_path / "state.json", cache_config=CACHE)
    with grpcclient.InferenceServerClient(server.url) as client:
        for seed in range(4):
            infer_fp32(client, "dropped", rows(seed))
        assert server.metric("peregrine_response_cache_entries") == 4
        client.unload_model("dropped")
        assert server.metric("peregrine_response_cache_entries") == 0
        assert server.metric("peregrine_response_cache_bytes") == 0
        client.load_model("dropped")
        infer_fp32(client, "dropped", rows(0))
        stats = statistics(client, "dropped").inference_stats
    assert stats.cache_miss.count == 1 and stats.cache_hit.count == 0


# -- concurrency ------------------------------------------------------------------------------


def test_two_clients_sending_the_same_inputs_at_once_both_get_right_answers(
    cached_server: ServerThread,
) -> None:
    inputs = [rows(100 + seed, count=2) for seed in range(30)]
    start = threading.Barrier(2)
    failures: list[str] = []

    def client_thread(name: str) -> None:
        with grpcclient.InferenceServerClient(cached_server.url) as client:
            start.wait(timeout=30)
            for index, data in enumerate(inputs):
                request_id = f"{name}-{index}"
                result = infer_fp32(client, "identity_fp32", data, request_id)
                if result.get_response().id != request_id:
                    failures.append(f"{request_id}: answered as {result.get_response().id}")
                if not np.array_equal(result.as_numpy("OUTPUT0"), data):
                    failures.append(f"{request_id}: wrong answer")

    with grpcclient.InferenceServerClient(cached_server.url) as client:
        before = statistics(client, "identity_fp32").inference_stats
        threads = [threading.Thread(target=client_thread, args=(name,)) for name in "ab"]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=120)
        after = statistics(client, "identity_fp32").inference_stats
    assert not failures, failures
    hits = after.cache_hit.count - before.cache_hit.count
    misses = after.cache_miss.count - before.cache_miss.count
    assert hits + misses == 2 * len(inputs)
    assert misses >= len(inputs)  # each input missed at least once
