"""The MLflow Model Registry as a model source, end to end (issue 5 item 3).

A real MLflow tracking server (SQLite backend store, artifacts proxied by the server, loopback)
is started once for the module. Versions of the scaled model (``OUTPUT0 = INPUT0 * version``,
so every answer says which version produced it) are logged the two ways people do it — with
the ``mlflow.onnx`` flavour and as a plain ``model.onnx`` artifact beside a ``config.pbtxt`` —
in runs that carry params, metrics, tags and a dataset. Our server, in poll mode, serves
``scaled@champion``; moving the alias makes it hot-swap while a client keeps sending requests.
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.logs import TextFormatter
from tests import model_factory
from tests.server_harness import ServerThread

pytestmark = [
    pytest.mark.skipif(
        importlib.util.find_spec("mlflow") is None,
        reason="mlflow is not installed (pip install -e '.[test]' installs it)",
    ),
    # MLflow's start-up dominates (10-20 s here); leave room for a slow machine.
    pytest.mark.timeout(300),
]

WIDTH = model_factory.SCALED_WIDTH
START_TIMEOUT_S = 120.0
POLL_SECS = 0.3
CLIENT_ENV = {"MLFLOW_DISABLE_TELEMETRY": "true", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def healthy(uri: str) -> bool:
    try:
        with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A tracking server subprocess on a free loopback port; its whole process group is
    killed at the end (it forks uvicorn workers)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    log_path = root / "server.log"
    env = {**os.environ, **CLIENT_ENV, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True,
        )
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not healthy(uri):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_text(errors="replace")[-3000:]
                pytest.fail(f"mlflow server did not come up on {uri}:\n{tail}")
            time.sleep(0.25)
        yield uri
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=15)


@pytest.fixture(scope="module")
def registry(mlflow_uri: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Registered model ``scaled``: v1 (mlflow.onnx flavour, factor 1) and v2 (plain artifact
    with a config.pbtxt, factor 2), alias champion -> v1; ``empty`` v1 holds no ONNX file."""
    for key, value in CLIENT_ENV.items():
        os.environ.setdefault(key, value)
    import mlflow
    import mlflow.onnx
    import onnx
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri, registry_uri=mlflow_uri)
    mlflow.set_tracking_uri(mlflow_uri)
    built = tmp_path_factory.mktemp("built")
    runs: dict[int, str] = {}
    for version in (1, 2):
        version_dir = model_factory.scaled_model_version(
            built, f"scaled_v{version}", version, float(version), with_config=True
        )
        with mlflow.start_run() as run:
            mlflow.log_params({"lr": str(0.1 * version), "epochs": "3"})
            mlflow.log_metric("accuracy", 0.90 + version / 100)
            mlflow.set_tags({"training_data": f"digits-2024-0{version}",
                             "mlflow.source.git.commit": f"abc{version}"})
            mlflow.log_input(
                mlflow.data.from_numpy(np.zeros((4, WIDTH), np.float32), name="digits-train",
                                       source="s3://bucket/digits.npy"),
                context="training",
            )
            if version == 1:
                mlflow.onnx.log_model(onnx.load(str(version_dir / "model.onnx")), name="model",
                                      registered_model_name="scaled")
            else:
                mlflow.log_artifact(str(version_dir / "model.onnx"), artifact_path="onnx")
                mlflow.log_artifact(str(version_dir.parent / "config.pbtxt"))
                client.create_model_version("scaled", source=mlflow.get_artifact_uri(),
                                            run_id=run.info.run_id)
            runs[version] = run.info.run_id
    text = tmp_path_factory.mktemp("text") / "README.txt"
    text.write_text("no model here\n")
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(text), artifact_path="docs")
        client.create_registered_model("empty")
        client.create_model_version("empty", source=mlflow.get_artifact_uri("docs"),
                                    run_id=run.info.run_id)
    client.set_registered_model_alias("scaled", "champion", "1")
    return {"client": client, "runs": runs, "gbm": register_gbm()}


def register_gbm() -> Any:
    """Registered model ``gbm`` v1: a scikit-learn gradient-boosting classifier logged with
    the sklearn flavour (no ONNX file: served by the mlflow_pyfunc backend). Returns it."""
    import mlflow.sklearn
    from mlflow.models import infer_signature
    from sklearn.datasets import load_iris
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = load_iris(return_X_y=True)
    model = GradientBoostingClassifier(n_estimators=10, random_state=0).fit(x, y)
    with mlflow.start_run():
        mlflow.sklearn.log_model(model, name="model", registered_model_name="gbm",
                                 signature=infer_signature(x, model.predict(x)),
                                 skops_trusted_types=["sklearn.tree._tree.Tree"],
                                 pip_requirements=["scikit-learn"])
    return model


def infer(client: grpcclient.InferenceServerClient, model: str,
          rows: int = 2) -> tuple[int, np.ndarray, np.ndarray]:
    data = np.random.default_rng(rows).standard_normal((rows, WIDTH)).astype(np.float32)
    tensor = grpcclient.InferInput("INPUT0", [rows, WIDTH], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor])
    return int(result.get_response().model_version), data, result.as_numpy("OUTPUT0")


class Traffic:
    """One client thread in a loop, checking each answer against the version that gave it."""

    def __init__(self, url: str, model: str) -> None:
        self.url, self.model = url, model
        self.versions: list[int] = []
        self.problems: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                try:
                    version, data, out = infer(client, self.model)
                except InferenceServerException as exc:
                    self.problems.append(f"request failed: {exc}")
                    continue
                if not np.array_equal(out, data * np.float32(version)):
                    self.problems.append(f"version {version} answered a wrong output")
                self.versions.append(version)

    def __enter__(self) -> Traffic:
        self._thread.start()
        wait_until(lambda: bool(self.versions or self.problems), "the first answer")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


@pytest.fixture(scope="module")
def server(registry: dict[str, Any], mlflow_uri: str,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    cache = tmp_path_factory.mktemp("cache")
    refs = ("scaled@champion", "pinned=scaled/2", "lost=scaled@nope", "empty/1", "gbm/1")
    with ServerThread(
        cache, model_source=mlflow_uri.replace("http://", "mlflow://"), mlflow_models=refs,
        model_cache_dir=cache, model_control_mode="poll", repository_poll_secs=POLL_SECS,
        strict_readiness=False,
    ) as running:
        yield running


def properties(url: str, model: str) -> dict[str, str]:
    """ModelMetadata properties (generated stubs: tritonclient's message predates them)."""
    import grpc

    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        response = stub.ModelMetadata(pb.ModelMetadataRequest(name=model), timeout=10)
    return dict(response.properties)


def test_serves_the_alias_version_with_its_run_metadata(
    server: ServerThread, registry: dict[str, Any]
) -> None:
    cache = server.settings.model_cache_dir
    with grpcclient.InferenceServerClient(server.url) as client:
        version, data, out = infer(client, "scaled")
        assert version == 1
        np.testing.assert_array_equal(out, data)
        config = client.get_model_config("scaled").config
    card = properties(server.url, "scaled")
    run_id = registry["runs"][1]
    assert card["card.mlflow.run.id"] == run_id
    assert card["card.mlflow.registry.version"] == "1"
    assert card["card.mlflow.registry.aliases"] == '["champion"]'
    assert card["card.mlflow.run.params.lr"] == "0.1"
    assert float(card["card.mlflow.run.metrics.accuracy"]) == pytest.approx(0.91)
    assert card["card.mlflow.run.tags.training_data"] == "digits-2024-01"
    assert card["card.mlflow.run.code_revision"] == "abc1"
    assert card["card.mlflow.run.datasets.digits-train.context"] == "training"
    assert config.parameters["card.mlflow.run.id"].string_value == run_id
    assert config.parameters["card.mlflow.run.params.epochs"].string_value == "3"
    assert [p.name for p in (cache / "scaled").iterdir() if p.name.isdigit()] == ["1"]
    assert (cache / "scaled" / "1" / "model.onnx").is_file()
    # The flavour's model.onnx came without a config: none written, the server auto-completes.
    assert not (cache / "scaled" / "config.pbtxt").exists()


def test_pinned_version_with_its_config_under_another_name(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        version, data, out = infer(client, "pinned", rows=3)
        config = client.get_model_config("pinned").config
    assert version == 2
    np.testing.assert_array_equal(out, data * 2)
    assert config.name == "pinned"
    assert config.max_batch_size == 8  # from the artifact's config.pbtxt
    assert config.HasField("dynamic_batching")
    assert properties(server.url, "pinned")["card.mlflow.registry.name"] == "scaled"


def test_a_scikit_learn_version_is_served_by_the_pyfunc_backend(
    server: ServerThread, registry: dict[str, Any]
) -> None:
    from sklearn.datasets import load_iris

    x = load_iris(return_X_y=True)[0][[0, 55, 110, 149]]
    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("input", list(x.shape), "FP64")
        tensor.set_data_from_numpy(x)
        result = client.infer("gbm", [tensor])
        config = client.get_model_config("gbm").config
    np.testing.assert_array_equal(result.as_numpy("output"), registry["gbm"].predict(x))
    assert result.get_response().model_version == "1"
    assert config.backend == "mlflow_pyfunc"
    assert properties(server.url, "gbm")["card.mlflow.registry.name"] == "gbm"
    assert (server.settings.model_cache_dir / "gbm" / "1" / "MLmodel").is_file()


def test_failures_are_clear_in_the_repository_index(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        index = {(m.name, m.version): (m.state, m.reason)
                 for m in client.get_model_repository_index().models}
    state, reason = index[("lost", "")]
    assert state == "UNAVAILABLE"
    assert "alias 'nope'" in reason and "'scaled'" in reason, reason
    state, reason = index[("empty", "")]
    assert state == "UNAVAILABLE"
    assert "no .onnx artifact and no MLflow model" in reason and "README.txt" in reason, reason


def test_moving_the_alias_hot_swaps_without_errors(
    server: ServerThread, registry: dict[str, Any]
) -> None:
    client, cache = registry["client"], server.settings.model_cache_dir
    first = (cache / "scaled" / "1" / "model.onnx").stat().st_ino
    with Traffic(server.url, "scaled") as traffic:
        client.set_registered_model_alias("scaled", "champion", "2")
        wait_until(lambda: traffic.versions[-1:] == [2], "version 2 answering")
        count = len(traffic.versions)
        wait_until(lambda: len(traffic.versions) > count + 20, "more answers")
        assert sorted(p.name for p in (cache / "scaled").iterdir() if p.name.isdigit()) == ["2"]
        client.set_registered_model_alias("scaled", "champion", "1")
        wait_until(lambda: traffic.versions[-1:] == [1], "version 1 answering again")
    assert traffic.problems == []
    switches = [b for a, b in zip(traffic.versions, traffic.versions[1:], strict=False)
                if a != b]
    assert switches == [2, 1], switches
    # The way back came out of the stash, not from a second download.
    assert (cache / "scaled" / "1" / "model.onnx").stat().st_ino == first
    assert properties(server.url, "scaled")["card.mlflow.registry.aliases"] == '["champion"]'


def test_an_unreachable_registry_is_a_load_failure_not_a_crash(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Bounded client retries: the server starts within seconds and says why nothing serves,
    without the credentials the tracking URI carries (in the reason and in our log lines)."""
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with ServerThread(tmp_path, model_source=f"mlflow://reader:s3cr3t@{address}",
                      mlflow_models=("digits@champion",), model_cache_dir=tmp_path) as running, \
            grpcclient.InferenceServerClient(running.url) as client:
        assert time.monotonic() - started < 30
        [entry] = client.get_model_repository_index().models
        assert not client.is_server_ready()
    assert (entry.name, entry.state) == ("digits", "UNAVAILABLE")
    assert f"MLflow registry http://{address}" in entry.reason, entry.reason
    assert "alias 'champion'" in entry.reason
    ours = [TextFormatter().format(r) for r in caplog.records if r.name.startswith("server.")]
    assert any("model failed to load" in line for line in ours)
    for text in (entry.reason, *ours):
        assert "s3cr3t" not in text and "reader" not in text, text
