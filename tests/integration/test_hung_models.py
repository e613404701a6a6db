"""Hung and slow models (issue: overload and faults, item 4): a batch that overruns its
model's execution timeout is cancelled and answered DEADLINE_EXCEEDED; an instance whose run
does not stop is quarantined and the model reports not ready, saying why; and SIGTERM stops a
real `peregrine serve` within --exit-timeout-secs even with a run stuck in a model, every
request answered or refused UNAVAILABLE."""

from __future__ import annotations

import json
import logging
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.integration.test_cli import Served, environment, free_port
from tests.integration.test_lifecycle import index, wait_until
from tests.server_harness import ServerThread

EXIT_TIMEOUT_S = 3.0
#: What the exit may take beyond --exit-timeout-secs: the metrics endpoint's shutdown (it polls
#: every 0.5 s), the interpreter's exit, a loaded shared machine.
EXIT_MARGIN_S = 2.0


def loop_inputs(trips: int) -> tuple[list[grpcclient.InferInput], np.ndarray]:
    x = np.arange(model_factory.SLOW_WIDTH, dtype=np.float32).reshape(1, -1)
    data = grpcclient.InferInput("INPUT0", [1, model_factory.SLOW_WIDTH], "FP32")
    data.set_data_from_numpy(x)
    count = grpcclient.InferInput("TRIPS", [1], "INT64")
    count.set_data_from_numpy(np.array([trips], dtype=np.int64))
    return [data, count], x


def one_input(name: str = "INPUT0", shape: tuple[int, ...] = (1,)) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput(name, list(shape), "FP32")
    tensor.set_data_from_numpy(np.ones(shape, dtype=np.float32))
    return [tensor]


def test_an_overrunning_batch_is_cancelled_and_answered_deadline_exceeded(
    tmp_path: Path,
) -> None:
    model_factory.loop_model(tmp_path, "loop", parameters={"execution_timeout_ms": "300"})
    with ServerThread(tmp_path) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        endless, _ = loop_inputs(10**12)
        with pytest.raises(InferenceServerException) as caught:
            client.infer("loop", endless)
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        assert "model 'loop' version 1" in caught.value.message()
        assert "execution timeout of 0.3 s" in caught.value.message()
        # onnxruntime stopped the run: the instance is back and serves.
        short, x = loop_inputs(3)
        out = client.infer("loop", short).as_numpy("OUTPUT0")
        np.testing.assert_array_equal(out, model_factory.loop_model_expected(x, 3))
        assert client.is_model_ready("loop")


def test_a_model_whose_run_cannot_stop_is_quarantined_and_reports_not_ready(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    # One MatMul of ~1.2 s: past the 0.2 s timeout and the 0.2 s grace that follows it.
    model_factory.stuck_model(tmp_path, "stuck", 3072,
                              parameters={"execution_timeout_ms": "200"})
    caplog.set_level(logging.WARNING, logger="server.scheduler.batcher")
    with ServerThread(tmp_path) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        assert metric(server.metrics_url, "peregrine_model_ready", "stuck") == 1.0
        with pytest.raises(InferenceServerException) as caught:
            client.infer("stuck", one_input())
        assert caught.value.status() == "StatusCode.DEADLINE_EXCEEDED"
        wait_until(lambda: not client.is_model_ready("stuck"), "the model to report not ready")
        state, reason = index(client)[("stuck", "1")]
        assert state == "UNAVAILABLE"
        assert "every instance is quarantined" in reason
        assert not client.is_server_ready()
        assert metric(server.metrics_url, "peregrine_model_ready", "stuck") == 0.0
        with pytest.raises(InferenceServerException) as refused:
            client.infer("stuck", one_input())
        assert refused.value.status() == "StatusCode.UNAVAILABLE"
        assert "quarantined" in refused.value.message()
    messages = [r.getMessage() for r in caplog.records]
    assert "model instance quarantined: its cancelled batch did not stop" in messages
    assert "model not ready: batcher stopped" in messages


def metric(metrics_url: str, family: str, model: str) -> float:
    """The sample of ``family`` for version 1 of ``model`` on /metrics (0 when absent)."""
    with urllib.request.urlopen(metrics_url, timeout=10) as response:
        text = response.read().decode()
    prefix = f'{family}{{model="{model}",version="1"}}'
    return next((float(line.split()[-1]) for line in text.splitlines()
                 if line.startswith(prefix)), 0.0)


def test_sigterm_stops_in_time_with_a_run_stuck_in_a_model(tmp_path: Path) -> None:
    """Requests in flight on a hung model (one running, three queued, one of them on an open
    stream): SIGTERM -> exit 0 within --exit-timeout-secs and a margin, and every request
    answered or refused UNAVAILABLE."""
    model_factory.stuck_model(tmp_path, "stuck")  # ~30 s in one kernel that ignores cancel
    model_factory.chain_model(tmp_path, "chain")
    grpc_port, metrics_port = free_port(), free_port()
    server = Served(["--model-repository", str(tmp_path), "--grpc-port", str(grpc_port),
                     "--metrics-port", str(metrics_port), "--log-format", "json",
                     "--exit-timeout-secs", str(EXIT_TIMEOUT_S)], environment())
    url = f"127.0.0.1:{grpc_port}"
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    unary: dict[str, Any] = {}
    streamed: list[Any] = []
    answered = threading.Condition()

    def keep(name: str) -> Any:
        def callback(result: Any, error: InferenceServerException | None) -> None:
            with answered:
                unary[name] = error if error is not None else result
                answered.notify_all()
        return callback

    def on_stream(result: Any, error: InferenceServerException | None) -> None:
        with answered:
            streamed.append(error if error is not None else result.get_response().id)
            answered.notify_all()

    clients = [grpcclient.InferenceServerClient(url) for _ in range(4)]
    try:
        server.wait_for_event("server started")
        for i, client in enumerate(clients[:3]):
            client.async_infer("stuck", one_input(), keep(f"stuck-{i}"), request_id=f"u{i}")
        stream = clients[3]
        stream.start_stream(callback=on_stream)
        for i in range(3):
            stream.async_stream_infer("chain", one_input(shape=(1, 16)), request_id=f"s{i}")
        stream.async_stream_infer("stuck", one_input(), request_id="s-stuck")
        # One stuck request runs, three wait behind it; the stream's chain requests are done.
        wait_until(lambda: metric(metrics_url, "nv_inference_pending_request_count",
                                  "stuck") == 3, "3 requests queued on 'stuck'")
        with answered:
            assert answered.wait_for(lambda: len(streamed) == 3, timeout=10), streamed

        stopping = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        server.wait_for_event("server stopping", timeout=10)
        # Arriving during the shutdown: refused, on a new call and on the open stream.
        with pytest.raises(InferenceServerException) as late:
            clients[0].infer("chain", one_input(shape=(1, 16)))
        assert late.value.status() == "StatusCode.UNAVAILABLE"
        stream.async_stream_infer("chain", one_input(shape=(1, 16)), request_id="s-late")

        assert server.proc.wait(timeout=EXIT_TIMEOUT_S + EXIT_MARGIN_S + 5) == 0
        took = time.monotonic() - stopping
        assert took < EXIT_TIMEOUT_S + EXIT_MARGIN_S, f"exit took {took:.1f} s"
        server.wait_for_event("server stopped", timeout=5)
        with answered:
            answered.wait_for(lambda: len(unary) == 3 and len(streamed) >= 6, timeout=10)
    finally:
        for client in clients:
            client.close()
        server.stop()

    assert sorted(unary) == ["stuck-0", "stuck-1", "stuck-2"]
    for name, outcome in unary.items():
        assert isinstance(outcome, InferenceServerException), (name, outcome)
        assert outcome.status() == "StatusCode.UNAVAILABLE", (name, outcome)
    assert streamed[:3] == ["s0", "s1", "s2"]
    # The stream's stuck and late requests were refused on the stream; the stream itself
    # ended UNAVAILABLE when the server closed.
    refusals = [e.message() for e in streamed[3:] if isinstance(e, InferenceServerException)]
    assert len(refusals) == len(streamed) - 3 >= 3, streamed
    assert all("UNAVAILABLE" in r or e.status() == "StatusCode.UNAVAILABLE"
               for r, e in zip(refusals, streamed[3:], strict=True)), streamed
    events = [json.loads(line) for line in server.lines]
    stuck = [e for e in events if e["event"].startswith("model instances still in a batch")]
    assert stuck and stuck[0]["model"] == "stuck"
    state = json.loads((tmp_path / ".peregrine-state.json").read_text(encoding="utf-8"))
    assert set(state["last_good"]) == {"stuck", "chain"}
