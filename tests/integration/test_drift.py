"""Drift monitoring through a real server: a drifting input stream sent with tritonclient shows
on /metrics, and ``peregrine drift report`` prints it and draws it."""

from __future__ import annotations

import logging
import re
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper, numpy_helper

from server.cli import main
from server.drift.detect import WindowReport
from tests.model_factory import TensorSpec, render_config, write_model
from tests.server_harness import ServerThread

FEATURES = 8
CLASSES = 3
DRIFTED = 2
WINDOW = 200


def classifier(seed: int = 7) -> onnx.ModelProto:
    """INPUT0 FP32 [N, 8] -> SCORES (softmax of a fixed linear map) and LABEL INT64 [N, 1]."""
    weights = np.random.default_rng(seed).normal(size=(FEATURES, CLASSES)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["INPUT0", "W"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["SCORES"], axis=1),
            helper.make_node("ArgMax", ["logits"], ["LABEL"], axis=1, keepdims=1),
        ],
        "drift_classifier",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", FEATURES])],
        [helper.make_tensor_value_info("SCORES", TensorProto.FLOAT, ["N", CLASSES]),
         helper.make_tensor_value_info("LABEL", TensorProto.INT64, ["N", 1])],
        initializer=[numpy_helper.from_array(weights, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def drift_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("drift_repo")
    config = render_config(
        "classifier",
        max_batch_size=8,
        inputs=[TensorSpec("INPUT0", "FP32", (FEATURES,))],
        outputs=[TensorSpec("SCORES", "FP32", (CLASSES,)), TensorSpec("LABEL", "INT64", (1,))],
        parameters={"drift_sample_rate": "1", "drift_window": str(WINDOW)},
    )
    write_model(repo, "classifier", classifier(), config)
    reference = np.random.default_rng(1).normal(size=(5000, FEATURES)).astype(np.float32)
    np.savez(repo.parent / "reference.npz", INPUT0=reference)
    return repo


def metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no {name} {labels} in /metrics")


def drifting(text: str) -> bool:
    try:
        return all(metric(text, "peregrine_drift_score", window=w) > 0.25
                   for w in ("fixed", "sliding"))
    except AssertionError:  # not evaluated yet
        return False


def test_a_drifting_stream_shows_on_metrics_and_in_the_report(
    drift_repo: Path, capsys: pytest.CaptureFixture[str], tmp_path: Path,
) -> None:
    assert main(["drift", "profile", "--model", "classifier", "--version", "1",
                 "--data", str(drift_repo.parent / "reference.npz"),
                 "--repository", str(drift_repo)]) == 0
    assert "outputs computed by running the model" in capsys.readouterr().out
    assert (drift_repo / "classifier" / "1" / "reference" / "profile.json").is_file()

    rng = np.random.default_rng(2)
    with ServerThread(drift_repo) as server:
        client = grpcclient.InferenceServerClient(server.url)
        for i in range(3 * WINDOW):
            x = rng.normal(size=(1, FEATURES)).astype(np.float32)
            if i >= WINDOW:  # the first window is clean, then one feature drifts
                x[:, DRIFTED] += 1.5
            tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
            tensor.set_data_from_numpy(x)
            client.infer("classifier", [tensor], request_id=f"req-{i}")
        client.close()
        text = ""
        for _ in range(100):  # the analyser passes every 0.25 s, the sliding window every 2 s
            text = urllib.request.urlopen(server.metrics_url).read().decode()
            if drifting(text):
                break
            time.sleep(0.1)
        drifted = f"INPUT0[{DRIFTED}]"
        assert metric(text, "peregrine_drift_samples_total", model="classifier") == 3 * WINDOW
        assert metric(text, "peregrine_drift_dropped_total", reason="ring_full") == 0
        assert metric(text, "peregrine_drift_alert_level", window="fixed") == 2
        assert metric(text, "peregrine_drift_psi", feature=drifted, window="fixed") > 0.25
        assert metric(text, "peregrine_drift_ks_pvalue", feature=drifted, window="fixed") < 1e-6
        assert metric(text, "peregrine_drift_feature_level", feature=drifted,
                      window="fixed") == 2
        assert metric(text, "peregrine_drift_feature_level", feature="INPUT0[0]",
                      window="fixed") == 0
        assert metric(text, "peregrine_drift_score", window="sliding") > 0.25

        # The same reports through the admin service and `peregrine drift status`.
        assert main(["drift", "status", "--url", server.url, "--model", "classifier"]) == 0
        status = capsys.readouterr().out.splitlines()
        fixed = next(i for i, line in enumerate(status) if "fixed window" in line)
        assert "level alert" in status[fixed]
        assert status[fixed + 2].split()[0] == drifted

    png = tmp_path / "drift.png"
    assert main(["drift", "report", "--model", "classifier", "--repository", str(drift_repo),
                 "--png", str(png)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("model classifier version 1:") and "level alert" in out[0]
    first_feature = out[2].split()
    assert first_feature[0] == drifted and "alert" in first_feature
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_a_dead_analyser_is_restarted_and_its_heartbeat_moves_again(
    drift_repo: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="server.drift.analyser")
    with ServerThread(drift_repo) as server:
        assert server.server is not None and server.server.drift is not None
        analyser = server.server.drift

        def scraped(name: str) -> float:
            text = urllib.request.urlopen(server.metrics_url).read().decode()
            (line,) = [line for line in text.splitlines() if line.startswith(name + " ")]
            return float(line.split()[1])

        def wait_for(condition: Callable[[], bool]) -> None:
            for _ in range(200):
                if condition():
                    return
                time.sleep(0.05)
            raise AssertionError("timed out")

        heartbeat = "peregrine_drift_analyser_heartbeat_timestamp_seconds"
        wait_for(lambda: scraped(heartbeat) > 0)
        assert scraped("peregrine_drift_analyser_restarts_total") == 0
        original = analyser.run_once
        injected = [RuntimeError("injected analysis failure")]

        def fails_once(now: float | None = None) -> list[WindowReport]:
            if injected:
                raise injected.pop()
            return original(now)

        monkeypatch.setattr(analyser, "run_once", fails_once)
        wait_for(lambda: not injected)
        died = scraped(heartbeat)
        wait_for(lambda: scraped(heartbeat) > died)  # the successor thread passes again
        assert scraped("peregrine_drift_analyser_restarts_total") == 1
    (record,) = [r for r in caplog.records
                 if r.getMessage() == "drift analyser thread died; restarted"]
    assert "injected analysis failure" in record.error  # type: ignore[attr-defined]
    assert record.restarts == 1  # type: ignore[attr-defined]
