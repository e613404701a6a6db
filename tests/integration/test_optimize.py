"""``peregrine optimize`` against a real server polling its repository: each method's version
is picked up, loads and answers like its source; the report's accuracy is the one the served
version's answers give; the model card is served; ``--rollout`` shadows then canaries, and
stops with the reason when agreement falls short, leaving all traffic on the source."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from sklearn.datasets import load_digits

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.app import open_model_offline
from server.cli.main import main
from server.optimize import build
from tests.server_harness import ServerThread

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "models" / "mlp_classifier"
MODEL = "mlp_classifier"
METHODS = ("graph", "dynamic-int8", "static-int8", "fp16")


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The labelled digits the example MLP was trained on, as an evaluation .npz."""
    x, y = load_digits(return_X_y=True)
    path = tmp_path_factory.mktemp("data") / "digits.npz"
    np.savez(path, input=x.astype(np.float32), labels=y.astype(np.int64))
    return path, x.astype(np.float32), y.astype(np.int64)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    shutil.copytree(EXAMPLE, root / MODEL, ignore=shutil.ignore_patterns("2"))
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, model_control_mode="poll", repository_poll_secs=0.2) as running:
        yield running


@pytest.fixture(scope="module")
def client(server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(server.url) as c:
        yield c


def wait_ready(client: grpcclient.InferenceServerClient, version: str) -> None:
    deadline = time.monotonic() + 60
    while not client.is_model_ready(MODEL, version):
        assert time.monotonic() < deadline, f"version {version} never became ready"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def optimized(repo: Path, server: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray],
              client: grpcclient.InferenceServerClient) -> dict[str, build.Report]:
    """Each method's version, made while the server runs (its poller picks them up)."""
    spec, _ = open_model_offline(repo, MODEL)
    reports = {}
    for method in METHODS:
        reports[method] = build.run(build.Request(
            repository=repo, spec=spec, version="1", method=method, calibration=digits[0],
            eval=digits[0], batches=(1,)))
    for report in reports.values():
        wait_ready(client, report.candidate.version)
    return reports


def served_labels(client: grpcclient.InferenceServerClient, version: str,
                  x: np.ndarray) -> np.ndarray:
    labels = []
    for start in range(0, len(x), 64):
        rows = x[start:start + 64]
        tensor = grpcclient.InferInput("input", list(rows.shape), "FP32")
        tensor.set_data_from_numpy(rows)
        result = client.infer(MODEL, [tensor], model_version=version,
                              outputs=[grpcclient.InferRequestedOutput("label")])
        labels.append(result.as_numpy("label").reshape(-1))
    return np.concatenate(labels)


@pytest.mark.parametrize("method", METHODS)
def test_each_method_serves_answers_close_to_the_source(
        method: str, optimized: dict[str, build.Report],
        client: grpcclient.InferenceServerClient,
        digits: tuple[Path, np.ndarray, np.ndarray]) -> None:
    _, x, y = digits
    report = optimized[method]
    source = served_labels(client, "1", x)
    candidate = served_labels(client, report.candidate.version, x)
    agreement = float(np.mean(source == candidate))
    assert agreement >= 0.97
    # The report's figures are the served version's: computed, not constants.
    assert report.candidate.accuracy == pytest.approx(float(np.mean(candidate == y)))
    assert report.source.accuracy == pytest.approx(float(np.mean(source == y)))
    assert report.comparison.top1_agreement == pytest.approx(agreement)
    assert report.candidate.size_bytes == (
        Path(report.path) / "model.onnx").stat().st_size


def test_the_model_card_says_where_the_version_came_from(
        optimized: dict[str, build.Report], client: grpcclient.InferenceServerClient) -> None:
    report = optimized["static-int8"]
    config = client.get_model_config(MODEL, report.candidate.version, as_json=True)["config"]
    card = {k: v["string_value"] for k, v in config["parameters"].items()
            if k.startswith("card.")}
    assert card["card.derived_from.version"] == "1"
    assert card["card.optimization.method"] == "static-int8"
    assert card["card.optimization.calibration"].endswith("digits.npz")
    assert float(card["card.figures.accuracy"]) == pytest.approx(report.candidate.accuracy)
    assert int(card["card.figures.size_bytes"]) == report.candidate.size_bytes


def test_the_accuracy_follows_the_labels(
        repo: Path, tmp_path: Path, digits: tuple[Path, np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    """Wrong labels give the accuracy wrong labels deserve: the figure is measured."""
    _, x, y = digits
    wrong = tmp_path / "wrong.npz"
    np.savez(wrong, input=x, labels=(y + 1) % 10)
    assert main(["optimize", "--model", MODEL, "--version", "1", "--repository", str(repo),
                 "--method", "dynamic-int8", "--eval", str(wrong), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)["report"]
    assert report["source"]["accuracy"] < 0.05
    assert report["candidate"]["accuracy"] < 0.05
    assert report["comparison"]["top1_agreement"] > 0.97


def rollout(repo: Path, server: ServerThread, eval_file: Path, *extra: str) -> int:
    return main(["optimize", "--model", MODEL, "--version", "1", "--repository", str(repo),
                 "--method", "graph", "--eval", str(eval_file), "--rollout",
                 "--url", server.url, "--replay", "--shadow-comparisons", "20",
                 "--steps", "50,100", "--step-interval", "0.1", "--min-requests", "5",
                 "--max-p99-ratio", "1000", "--phase-timeout", "60", *extra])


def route(server: ServerThread) -> admin.RouteStatus:
    with grpc.insecure_channel(server.url) as channel:
        return admin_grpc.PeregrineAdminStub(channel).GetRoute(admin.RouteRequest(model=MODEL))


def test_rollout_shadows_then_canaries_to_all_traffic(
        repo: Path, server: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert rollout(repo, server, digits[0]) == 0
    out = capsys.readouterr().out
    assert "shadow candidate" in out and "rollout done" in out
    status = route(server)
    assert status.canary_state == "promoted"
    weights = {v.name: v.weight for v in status.table.variants}
    assert weights["candidate"] == 100


def test_rollout_stops_with_the_reason_when_agreement_falls_short(
        repo: Path, server: ServerThread, digits: tuple[Path, np.ndarray, np.ndarray],
        capsys: pytest.CaptureFixture[str]) -> None:
    assert rollout(repo, server, digits[0], "--min-agreement", "1.01") == 1
    out = capsys.readouterr().out
    assert "rollout stopped: shadow agreement 1.0000 is below 1.01" in out
    assert "the routing table sends all unversioned traffic of 'mlp_classifier' to version 1" \
        in out
    # Not a cleared table: without one, unversioned requests would go to the candidate.
    status = route(server)
    assert [(v.version, v.weight) for v in status.table.variants] == [("1", 100)]
    assert not status.table.HasField("shadow") and not status.table.HasField("canary")
