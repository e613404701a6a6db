"""The continuous-training loop on the bundled MLP as docs/operations.md shows it, on a real
server: a table keeps the served version on all unversioned traffic, drifted traffic brings
its drift level to alert, the retrain hook runs examples/retrain_mlp.py once, the script
publishes the next version, poll mode loads it (and it takes no unversioned traffic), then a
shadow compares it and a guarded canary promotes it. Every step is read from the server's
own state: /metrics, the repository index, the route status."""

from __future__ import annotations

import shutil
import sys
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import numpy as np
import pytest
from sklearn.datasets import load_digits

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.app import open_model_offline
from server.cli.main import main
from server.cli.rollout import Replay
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
MODEL = "mlp_classifier"
WINDOW = 200


@pytest.fixture(scope="module")
def repo(examples_repo: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example MLP's version 1 with drift monitoring, profiled on the digits."""
    root = tmp_path_factory.mktemp("ct") / "repo"
    shutil.copytree(examples_repo / MODEL, root / MODEL, ignore=shutil.ignore_patterns("2"))
    with (root / MODEL / "config.pbtxt").open("a") as config:
        config.write('parameters { key: "drift_sample_rate" value: { string_value: "1" } }\n'
                     f'parameters {{ key: "drift_window" value: {{ string_value: "{WINDOW}" }} '
                     "}\n")
    reference = root.parent / "digits.npz"
    np.savez(reference, input=load_digits().data.astype(np.float32))
    assert main(["drift", "profile", "--model", MODEL, "--version", "1", "--data",
                 str(reference), "--repository", str(root)]) == 0
    return root


def wait_for(what: str, condition: Callable[[], bool], timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def route(server: ServerThread, *flags: str) -> None:
    assert main(["route", "set", MODEL, *flags, "--url", server.url]) == 0


def test_drift_retrains_publishes_and_a_guarded_canary_promotes(repo: Path) -> None:
    spec, _ = open_model_offline(repo, MODEL)
    brighter = np.clip(load_digits().data + 6.0, 0, 16).astype(np.float32)  # the drift
    hook = f"{sys.executable} {ROOT / 'examples' / 'retrain_mlp.py'}"
    with ServerThread(repo, model_control_mode="poll", repository_poll_secs=0.2,
                      retrain_command=hook, retrain_cooldown_secs=3600) as server, \
            grpc.insecure_channel(server.url) as channel:
        infer = pb_grpc.GRPCInferenceServiceStub(channel)
        routes = admin_grpc.PeregrineAdminStub(channel)

        def status() -> admin.RouteStatus:
            return routes.GetRoute(admin.RouteRequest(model=MODEL))

        def runs(outcome: str) -> float:
            return server.metric("peregrine_retrain_hook_runs_total", model=MODEL,
                                 version="1", outcome=outcome) or 0

        def ready_versions() -> set[str]:
            index = infer.RepositoryIndex(pb.RepositoryIndexRequest(ready=True))
            return {m.version for m in index.models if m.name == MODEL}

        def answered_by() -> str:
            request = pb.ModelInferRequest(model_name=MODEL, inputs=[
                pb.ModelInferRequest.InferInputTensor(name="input", datatype="FP32",
                                                      shape=[1, 64])],
                raw_input_contents=[brighter[:1].tobytes()])
            return str(infer.ModelInfer(request).model_version)

        # The served version keeps unversioned traffic while a new one is judged.
        route(server, "--variant", "stable=1:100")
        with Replay(channel, (), spec, {"input": brighter}):
            wait_for("the drift alert", lambda: server.metric(
                "peregrine_drift_alert_level", model=MODEL, version="1", window="fixed") == 2)
            wait_for("the retrain run", lambda: runs("ok") == 1, timeout=300)
            wait_for("version 2 to load", lambda: ready_versions() == {"1", "2"})
            assert answered_by() == "1"

            route(server, "--variant", "stable=1:100", "--shadow", "next=2:1")
            wait_for("the shadow's comparisons", lambda: status().shadow.compared >= 50)
            shadow = status().shadow
            assert shadow.failed == 0 and 0.0 <= shadow.agreement <= 1.0

            route(server, "--variant", "stable=1:100", "--variant", "next=2:0",
                  "--canary", "stable:next", "--steps", "50,100", "--step-interval", "0.2",
                  "--min-requests", "5", "--max-p99-ratio", "1000")
            wait_for("the canary to end", lambda: status().canary_state != "running")
        final = status()
        assert final.canary_state == "promoted", final.canary_reason
        assert {v.version: v.weight for v in final.table.variants} == {"1": 0, "2": 100}
        assert answered_by() == "2"
        # Once per cool-down: one run, and no run of any other outcome.
        assert runs("ok") == 1
        assert all(runs(other) == 0 for other in ("failed", "timeout", "error", "dropped"))
