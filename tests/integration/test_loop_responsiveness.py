"""The event loop stays responsive (issue: overload and faults, item 3): a batch runs inline on
the loop only when its predicted time and its input bytes are both small, so huge requests
after a long run of tiny ones go to the instance's thread, and ServerLive keeps answering in
milliseconds meanwhile; the loop's lag is exported as a metric.

The server, the client sending the huge requests and the client timing ServerLive are three
processes: in one interpreter, the huge requests' (de)serialisation in the client holds the
GIL for long enough to show up in the timings of the other threads.
"""

from __future__ import annotations

import multiprocessing
import os
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests import model_factory
from tests.integration.test_cli import Served, environment, free_port

#: The chain model's length: 0.15 ms for a tiny request (run inline under the model's
#: inline_execution_max_us of 1 ms), ~0.35 s for a huge one of 3 MiB (2-core development
#: machine): long work for little data, so the clients' own work stays small.
STEPS = 200
HUGE = 768 * 1024
TINY = 16


def chain_input(values: int) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", [1, values], "FP32")
    tensor.set_data_from_numpy(np.full((1, values), 0.5, dtype=np.float32))
    return [tensor]


def send_tiny_then_huge(url: str) -> None:
    """Four times: a long run of cheap one-row batches (one row then predicts an inline run),
    then a huge request of one row. Run in a process of its own, at the lowest priority: its
    own work on the huge tensors must not take the CPU from the server or the timing client
    (the development machine has two cores)."""
    os.nice(19)
    with grpcclient.InferenceServerClient(url) as client:
        for _ in range(4):
            for _ in range(60):
                client.infer("chain", chain_input(TINY))
            client.infer("chain", chain_input(HUGE))


def live_latencies(url: str, done: Callable[[], bool], every_s: float = 0.005) -> list[float]:
    """ServerLive sent on a fixed schedule (open loop) until ``done()``: each latency is
    counted from when its call was due, so a loop stall delays every call due during it (a
    client waiting for each answer before the next would see a stall once)."""
    latencies: list[float] = []
    lock = threading.Lock()
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        stub.ServerLive(pb.ServerLiveRequest(), timeout=10)  # connected
        calls = []
        due = time.perf_counter()
        while not done():
            due += every_s
            time.sleep(max(0.0, due - time.perf_counter()))

            def finished(_call: grpc.Future, due: float = due) -> None:
                with lock:
                    latencies.append(time.perf_counter() - due)

            call = stub.ServerLive.future(pb.ServerLiveRequest(), timeout=10)
            call.add_done_callback(finished)
            calls.append(call)
        for call in calls:
            assert call.result().live
    return latencies


@pytest.fixture
def chain_server(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A `peregrine serve` process serving the chain model: (gRPC url, metrics url)."""
    model_factory.chain_model(tmp_path, "chain", STEPS,
                              parameters={"inline_execution_max_us": "1000"})
    grpc_port, metrics_port = free_port(), free_port()
    server = Served(["--model-repository", str(tmp_path), "--grpc-port", str(grpc_port),
                     "--metrics-port", str(metrics_port), "--log-format", "json"],
                    environment())
    try:
        server.wait_for_event("server started")
        yield f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{metrics_port}/metrics"
    finally:
        server.stop()


def round_of_live_latencies(url: str) -> list[float]:
    """ServerLive latencies while another process sends tiny, then huge requests."""
    sender = multiprocessing.get_context("spawn").Process(target=send_tiny_then_huge,
                                                          args=(url,))
    sender.start()
    try:
        latencies = live_latencies(url, lambda: not sender.is_alive())
    finally:
        sender.join(timeout=60)
    assert sender.exitcode == 0
    assert len(latencies) >= 100, len(latencies)
    return latencies


def test_server_live_answers_fast_while_huge_requests_run_after_tiny_ones(
    chain_server: tuple[str, str],
) -> None:
    """Up to three rounds, the first under the bound passes: the development machine is
    shared (two cores, other test runs), and its load alone can push a round's p99 over
    50 ms. A server that ran the huge requests inline cannot pass a round: they hold its loop
    for over a third of it (p99 of 0.8 to 1 s when the byte bound is lifted)."""
    url, metrics_url = chain_server
    p99s = []
    for _ in range(3):
        latencies = round_of_live_latencies(url)
        p99s.append(float(np.percentile(latencies, 99)))
        if p99s[-1] < 0.050:
            break
    assert p99s[-1] < 0.050, f"ServerLive p99 per round: {[f'{p * 1000:.1f} ms' for p in p99s]}"

    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        metrics = response.read().decode()
    counts = [line for line in metrics.splitlines()
              if line.startswith("peregrine_event_loop_lag_seconds_count")]
    assert counts and float(counts[0].split()[-1]) > 0, counts
