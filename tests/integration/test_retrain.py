"""The continuous-training hook through a real server: a drifting stream brings a version's
fixed window to alert, and the configured command (or URL) gets the payload once per
cool-down, logged, counted and audited; a hanging command never disturbs serving."""

from __future__ import annotations

import itertools
import json
import logging
import sys
import threading
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server.cli import main
from server.drift.detect import Level, WindowReport
from server.drift.retrain import FAILED, RetrainHook, Run
from server.drift.retrain_options import RetrainSettings
from tests import model_factory
from tests.integration.test_drift import CLASSES, DRIFTED, FEATURES, classifier
from tests.model_factory import TensorSpec, render_config, write_model
from tests.server_harness import ServerThread

WINDOW = 100
COOLDOWN = 1.0


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("retrain_repo")
    config = render_config(
        "classifier", max_batch_size=8,
        inputs=[TensorSpec("INPUT0", "FP32", (FEATURES,))],
        outputs=[TensorSpec("SCORES", "FP32", (CLASSES,)), TensorSpec("LABEL", "INT64", (1,))],
        parameters={"drift_sample_rate": "1", "drift_window": str(WINDOW)},
    )
    write_model(repo, "classifier", classifier(), config)
    reference = repo.parent / "reference.npz"
    np.savez(reference, INPUT0=np.random.default_rng(1).normal(size=(3000, FEATURES))
             .astype(np.float32))
    assert main(["drift", "profile", "--model", "classifier", "--version", "1",
                 "--data", str(reference), "--repository", str(repo)]) == 0
    return repo


def drive(server: ServerThread, windows: int = 3) -> None:
    """One clean window, then windows where one feature has moved: the level reaches alert."""
    rng = np.random.default_rng(2)
    client = grpcclient.InferenceServerClient(server.url)
    for i in range(windows * WINDOW // 4):
        x = rng.normal(size=(4, FEATURES)).astype(np.float32)
        if i * 4 >= WINDOW:
            x[:, DRIFTED] += 2.0
        tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        client.infer("classifier", [tensor], request_id=f"r{i}")
    client.close()


def serves(server: ServerThread) -> bool:
    client = grpcclient.InferenceServerClient(server.url)
    tensor = grpcclient.InferInput("INPUT0", [1, FEATURES], "FP32")
    tensor.set_data_from_numpy(np.zeros((1, FEATURES), dtype=np.float32))
    result = client.infer("classifier", [tensor])
    client.close()
    return result.as_numpy("SCORES").shape == (1, CLASSES)


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.05)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_the_command_gets_the_payload_once_per_cool_down(repo: Path, tmp_path: Path) -> None:
    received = tmp_path / "received.jsonl"
    script = tmp_path / "hook.py"
    script.write_text("import os, sys\n"
                      f"with open({str(received)!r}, 'a') as out:\n"
                      "    out.write(sys.stdin.read().strip() + '\\n')\n"
                      "assert open(os.environ['PEREGRINE_RETRAIN_PAYLOAD']).read()\n"
                      "print('retraining', os.environ['PEREGRINE_RETRAIN_MODEL'])\n")
    audit = tmp_path / "audit.log"
    with ServerThread(repo, retrain_command=f"{sys.executable} {script}",
                      retrain_cooldown_secs=COOLDOWN, audit_log=audit) as server:
        drive(server)
        wait_for(lambda: len(lines(received)) >= 2)  # the level stays at alert: it fires again
        # A run is counted and audited once its command has exited, after it wrote the file.
        wait_for(lambda: (server.metric("peregrine_retrain_hook_runs_total", model="classifier",
                                        version="1", outcome="ok") or 0) >= 2)
        assert serves(server)
    payloads = lines(received)
    first = payloads[0]
    assert (first["model"], first["version"], first["reason"]) == ("classifier", "1",
                                                                   "drift_alert")
    window = first["window"]
    assert window["level"] == "alert" and window["rows"] == WINDOW and window["kind"] == "fixed"
    assert window["features"][0]["feature"] == f"INPUT0[{DRIFTED}]"
    assert window["features"][0]["level"] == "alert" and window["features"][0]["psi"] > 0.25
    store = Path(first["store"]["directory"])
    assert first["store"]["windows"] and (store / first["store"]["windows"][-1]).is_file()
    fired = [datetime.fromisoformat(p["fired_at"]) for p in payloads]
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(fired)]
    assert all(gap >= COOLDOWN - 0.01 for gap in gaps), gaps  # never twice in a cool-down
    audited = [json.loads(line) for line in audit.read_text().splitlines()]
    hook_lines = [a for a in audited if a["rpc"] == "RetrainHook"]
    assert len(hook_lines) >= 2
    assert hook_lines[0]["target"] == "classifier" and hook_lines[0]["outcome"] == "OK"
    assert "version 1, drift_alert: exit 0" in hook_lines[0]["detail"]


class _Receiver(BaseHTTPRequestHandler):
    bodies: list[dict[str, Any]] = []

    def do_POST(self) -> None:
        length = int(self.headers["Content-Length"])
        assert self.headers["Content-Type"] == "application/json"
        type(self).bodies.append(json.loads(self.rfile.read(length)))
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"queued")

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    _Receiver.bodies = []
    http = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    thread = threading.Thread(target=http.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{http.server_address[1]}/retrain", _Receiver.bodies
    http.shutdown()
    http.server_close()


def test_a_url_gets_one_post_within_a_long_cool_down(
    repo: Path, receiver: tuple[str, list[dict[str, Any]]],
) -> None:
    url, bodies = receiver
    with ServerThread(repo, retrain_url=url, retrain_cooldown_secs=3600) as server:
        assert server.server is not None and server.server.drift is not None
        analyser = server.server.drift
        drive(server, windows=4)
        wait_for(lambda: len(bodies) >= 1)
        beat = analyser.heartbeat
        wait_for(lambda: analyser.heartbeat > beat + 1.0)  # passes go on at alert
        assert server.metric("peregrine_retrain_hook_runs_total", model="classifier",
                             version="1", outcome="ok") == 1
    assert len(bodies) == 1
    assert bodies[0]["window"]["level"] == "alert" and bodies[0]["model"] == "classifier"


def test_a_hanging_command_is_killed_logged_and_counted_while_serving_goes_on(
    repo: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="server.drift.retrain")
    with ServerThread(repo, retrain_command="sh -c 'echo started; sleep 60'",
                      retrain_timeout_secs=0.5, retrain_cooldown_secs=3600) as server:
        drive(server)
        assert serves(server)  # the command hangs meanwhile
        wait_for(lambda: server.metric("peregrine_retrain_hook_runs_total", model="classifier",
                                       version="1", outcome="timeout") == 1)
        assert serves(server)
    (record,) = [r for r in caplog.records if r.getMessage() == "retrain hook ran"]
    assert record.outcome == "timeout"  # type: ignore[attr-defined]
    assert record.detail == "killed after 0.5 s"  # type: ignore[attr-defined]
    assert "started" in record.output_tail  # type: ignore[attr-defined]


def test_a_failing_command_is_recorded_with_its_exit_status_and_output(tmp_path: Path) -> None:
    runs: list[Run] = []
    done = threading.Event()
    hook = RetrainHook(
        RetrainSettings(command=f"{sys.executable} -c \"print('no data'); raise SystemExit(3)\""),
        tmp_path, lambda run: (runs.append(run), done.set()))
    report = WindowReport("m", "2", "fixed", 0, 10, (), 0.5, Level.ALERT)
    assert hook.consider(report, 10, None, "", now=100.0) == "drift_alert"
    assert hook.consider(report, 20, None, "", now=100.5) is None  # within the cool-down
    assert done.wait(30)
    hook.close()
    (run,) = runs
    assert (run.model, run.version, run.outcome, run.detail) == ("m", "2", FAILED, "exit 3")
    assert "no data" in run.tail


def test_a_hook_with_no_drift_monitoring_says_it_never_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    model_factory.identity_model(tmp_path, "plain", "FP32")  # no drift_sample_rate
    with ServerThread(tmp_path, retrain_command="true"):
        pass
    assert any("the retrain hook never runs" in r.getMessage() for r in caplog.records)
