"""Several frontends in front of one engine (--frontends N), what only that mode has: the
frontend processes share the port, a frontend that dies is replaced and the others go on,
streams longer than the credit window flow both ways, a cancelled call ends in the engine,
a stop leaves no process or socket behind, and the frontends exit when the engine dies."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from server._pb import grpc_service_pb2 as pb
from server.metrics.frontends import STATS_INTERVAL_S
from server.multiproc.frames import WINDOW
from server.multiproc.supervisor import Frontends
from tests import model_factory
from tests.integration.test_cli import free_port
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("frontends_repo")
    model_factory.identity_model(root, "identity_fp32", "FP32")
    model_factory.slow_model(root, "slow", delay_ms=300.0, max_batch_size=1)
    return root


@pytest.fixture
def served(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, frontends=2) as server:
        yield server


def frontends_of(server: ServerThread) -> Frontends:
    assert server.server is not None and server.server.frontends is not None
    return server.server.frontends


def infer(url: str, value: float) -> np.ndarray:
    x = np.full((1, 4), value, np.float32)
    tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
    tensor.set_data_from_numpy(x)
    with grpcclient.InferenceServerClient(url) as client:
        out = client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0")
    assert out is not None
    return out


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    return state != "Z"


def wait_for(condition: object, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def test_the_frontends_are_processes_of_their_own_on_one_port(served: ServerThread) -> None:
    pids = frontends_of(served).pids
    assert len(pids) == 2 and os.getpid() not in pids and all(alive(p) for p in pids)
    # New connections land on either frontend; each answers.
    for i in range(8):
        np.testing.assert_array_equal(infer(served.url, i), np.full((1, 4), i, np.float32))


def frontend_samples(server: ServerThread) -> dict[tuple[str, str], float]:
    """(sample name, frontend label) -> value of every peregrine_frontend_* sample."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return {(sample.name, sample.labels.get("frontend", "")): sample.value
            for family in text_string_to_metric_families(text)
            if family.name.startswith("peregrine_frontend")
            for sample in family.samples if "le" not in sample.labels}


def test_a_frontend_that_dies_is_replaced_and_the_server_goes_on(served: ServerThread) -> None:
    frontends = frontends_of(served)
    victim, survivor = frontends.pids
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: frontends.restarts == 1, "the frontend to be replaced")
    assert victim not in frontends.pids and survivor in frontends.pids
    wait_for(lambda: all(alive(p) for p in frontends.pids), "the new frontend")
    for i in range(8):
        np.testing.assert_array_equal(infer(served.url, i), np.full((1, 4), i, np.float32))
    # The new process reports in its predecessor's slot: still one series per frontend.
    wait_for(lambda: len(frontends.stats) == 2
             and {s.pid for s in frontends.stats.values()} == set(frontends.pids),
             "both frontends' figures")
    samples = frontend_samples(served)
    assert samples[("peregrine_frontend_restarts_total", "")] == 1
    assert {label for name, label in samples if name.startswith(
        "peregrine_frontend_resident")} == {"1", "2"}


def test_each_frontends_own_figures_are_on_the_engines_metrics(served: ServerThread) -> None:
    frontends = frontends_of(served)
    wait_for(lambda: len(frontends.stats) == 2, "both frontends' figures")
    for pid, slot in ((s.pid, slot) for slot, s in frontends.stats.items()):
        assert frontends.pids[slot - 1] == pid
    before = frontend_samples(served)
    for i in range(50):
        infer(served.url, i)
    time.sleep(STATS_INTERVAL_S * 1.5)
    after = frontend_samples(served)
    for slot in ("1", "2"):
        assert after[("peregrine_frontend_resident_memory_bytes", slot)] > 10 * 2**20
        assert after[("peregrine_frontend_event_loop_lag_seconds_count", slot)] > 0
        assert after[("peregrine_frontend_cpu_seconds_total", slot)] \
            >= before[("peregrine_frontend_cpu_seconds_total", slot)]
    # The calls' work shows in the frontends' CPU (each took some of the 50 connections).
    assert sum(after[("peregrine_frontend_cpu_seconds_total", s)] for s in ("1", "2")) \
        > sum(before[("peregrine_frontend_cpu_seconds_total", s)] for s in ("1", "2"))
    assert after[("peregrine_frontend_restarts_total", "")] == 0


def stream_request(value: float, request_id: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="identity_fp32", id=request_id)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(np.full((1, 4), value, np.float32).tobytes())
    return request


async def stream_many(url: str, count: int) -> dict[str, bytes]:
    async with grpc.aio.insecure_channel(url) as channel:
        call = channel.stream_stream(
            "/inference.GRPCInferenceService/ModelStreamInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString)(
                iter([stream_request(i, str(i)) for i in range(count)]))
        answers = {}
        async for response in call:
            assert not response.error_message
            answers[response.infer_response.id] = response.infer_response.raw_output_contents[0]
        return answers


def test_a_stream_far_longer_than_the_credit_window_is_answered_whole(
    served: ServerThread,
) -> None:
    count = 20 * WINDOW
    answers = asyncio.run(stream_many(served.url, count))
    assert sorted(answers, key=int) == [str(i) for i in range(count)]
    for key, raw in answers.items():
        np.testing.assert_array_equal(np.frombuffer(raw, np.float32), np.full(4, int(key)))


def engine_inflight(server: ServerThread) -> int:
    assert server.server is not None
    admission = server.server.admission

    async def read() -> int:
        return admission.inflight

    result: int = server.call(read())
    return result


def test_a_call_the_client_cancels_ends_in_the_engine(served: ServerThread) -> None:
    """Four 300 ms requests to a one-instance model: one runs, three queue. Cancelled by the
    client, the queued three leave the engine's queue at once (the frontend's CANCEL reaches
    the engine) and never run: the model executes only what was running."""
    with grpc.insecure_channel(served.url) as channel:
        request = pb.ModelInferRequest(model_name="slow")
        request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 256])
        request.raw_input_contents.append(np.ones((1, 256), np.float32).tobytes())
        infer_call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelInferResponse.FromString)
        calls = [infer_call.future(request, timeout=30) for _ in range(4)]
        wait_for(lambda: engine_inflight(served) == 4, "4 requests in the engine")
        for call in calls:
            call.cancel()
        assert all(call.cancelled() for call in calls)
    wait_for(lambda: engine_inflight(served) == 0, "the cancelled requests to end")
    time.sleep(0.5)  # past the running batch: a request left queued would have started
    with grpcclient.InferenceServerClient(served.url) as client:
        (stats,) = client.get_inference_statistics("slow", "1").model_stats
    assert stats.execution_count <= 2 < 4  # the running batch (at most one more had begun)
    assert stats.inference_stats.success.count == 0


def unix_sockets() -> set[str]:
    """Names of the Unix sockets bound on this host ('@' for the abstract namespace)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return {line.split()[-1] for line in lines if len(line.split()) > 7}


def test_a_stop_leaves_no_frontend_and_no_socket(repo: Path) -> None:
    with ServerThread(repo, frontends=2) as server:
        frontends = frontends_of(server)
        pids = frontends.pids
        name = "@" + frontends.address[1:]
        assert name in unix_sockets()
        infer(server.url, 1.0)
    assert not any(alive(p) for p in pids)
    assert name not in unix_sockets()


def test_only_the_engines_own_frontends_may_connect_to_its_socket(
    served: ServerThread,
) -> None:
    """Another local process connecting to the engine's socket is closed at once: the calls
    a frontend forwards carry its word for the client's peer and certificate."""
    import socket

    address = frontends_of(served).address
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stranger:
        stranger.connect(address)
        stranger.settimeout(10)
        assert stranger.recv(1) == b""  # closed by the engine
    np.testing.assert_array_equal(infer(served.url, 3.0), np.full((1, 4), 3.0, np.float32))


def test_the_frontends_exit_when_the_engine_is_killed(repo: Path, tmp_path: Path) -> None:
    port = free_port()
    engine = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repo),
         "--grpc-port", str(port), "--allow-metrics", "false", "--frontends", "2"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"127.0.0.1:{port}"

        def listening() -> bool:
            try:
                with grpcclient.InferenceServerClient(url) as client:
                    return bool(client.is_server_ready())
            except Exception:
                return False

        wait_for(listening, "the server to be ready", timeout=60)
        children = [int(p) for p in Path(f"/proc/{engine.pid}/task/{engine.pid}/children")
                    .read_text().split()]
        assert len(children) == 2
        engine.kill()
        engine.wait(timeout=10)
        wait_for(lambda: not any(alive(p) for p in children), "the frontends to exit")
    finally:
        if engine.poll() is None:
            engine.kill()
