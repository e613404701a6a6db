"""Model lifecycle end to end (issue 5): hot swaps under load in poll and explicit mode,
rejected broken and half-copied versions, version removal, explicit version requests, model
cards, durability across restarts, memory after load/unload cycles, and the model-control
RPCs and `peregrine repo` commands.

Every swap test runs client threads (tritonclient.grpc) that check each answer against the
version that produced it (``OUTPUT0 = INPUT0 * version``), that a thread never sees the
version go backwards, and that each answer came from a version that was legitimately
serving while the request was in flight.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests import model_factory
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
POLL_SECS = 0.2
MODEL = "scaled"
WIDTH = model_factory.SCALED_WIDTH
StartServer = Callable[..., ServerThread]


# -- helpers ----------------------------------------------------------------------------------


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.02)


def index(client: grpcclient.InferenceServerClient) -> dict[tuple[str, str], tuple[str, str]]:
    """(model, version) -> (state, reason)."""
    models = client.get_model_repository_index().models
    return {(m.name, m.version): (m.state, m.reason) for m in models}


def versions_in_index(client: grpcclient.InferenceServerClient, model: str) -> set[str]:
    return {v for (name, v), _ in index(client).items() if name == model and v}


def infer(
    client: grpcclient.InferenceServerClient, model: str = MODEL, version: str = "",
    rows: int = 2, seed: int = 0,
) -> tuple[int, np.ndarray, np.ndarray]:
    """(answering version, input, output) of one request."""
    data = np.random.default_rng(seed).standard_normal((rows, WIDTH)).astype(np.float32)
    tensor = grpcclient.InferInput("INPUT0", [rows, WIDTH], "FP32")
    tensor.set_data_from_numpy(data)
    result = client.infer(model, [tensor], model_version=version)
    return int(result.get_response().model_version), data, result.as_numpy("OUTPUT0")


def answers_with_factor(client: grpcclient.InferenceServerClient, version: str,
                        factor: float) -> bool:
    _, data, out = infer(client, version=version)
    return np.array_equal(out, data * np.float32(factor))


def metrics_text(server: ServerThread) -> str:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text: str = response.read().decode()
    return text


def repo_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PEREGRINE_")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "repo", "--url", url, *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=False,
    )


@contextlib.contextmanager
def pb_stub(url: str) -> Iterator[pb_grpc.GRPCInferenceServiceStub]:
    """Generated stubs: tritonclient's ModelMetadataResponse predates ``properties``."""
    with grpc.insecure_channel(url) as channel:
        yield pb_grpc.GRPCInferenceServiceStub(channel)


def override(versions: list[int], **extra: Any) -> str:
    """A RepositoryModelLoad config override: the scaled model's config with a version policy."""
    return json.dumps({
        "name": MODEL, "platform": "onnxruntime_onnx", "max_batch_size": 8,
        "input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
        "output": [{"name": "OUTPUT0", "data_type": "TYPE_FP32", "dims": [WIDTH]}],
        "dynamic_batching": {},
        "version_policy": {"specific": {"versions": versions}},
        **extra,
    })


@dataclass
class Swaps:
    """When each version was published and when its predecessor was seen gone (monotonic)."""

    published: dict[int, float] = field(default_factory=lambda: {1: float("-inf")})
    retired: dict[int, float] = field(default_factory=dict)


class Traffic:
    """Client threads sending requests in a loop, checking every answer.

    Version ``v`` of the served model answers ``INPUT0 * factor(v)``. Per thread, the
    answering version never goes backwards (unless ``monotonic`` is off); with ``swaps``,
    an answer from version ``v`` must arrive after ``v`` was published and must have been
    sent before ``v`` was seen retired.
    """

    def __init__(
        self,
        url: str,
        model: str = MODEL,
        *,
        threads: int = 4,
        version: str = "",
        factor: Callable[[int], float] = float,
        swaps: Swaps | None = None,
        monotonic: bool = True,
        pause_s: float = 0.004,
    ) -> None:
        self.url, self.model, self.version = url, model, version
        self.factor, self.swaps, self.monotonic, self.pause_s = factor, swaps, monotonic, pause_s
        self.failures: list[str] = []
        self.wrong: list[str] = []
        self.seen: Counter[int] = Counter()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True,
                                          name=f"traffic-{i}") for i in range(threads)]

    def __enter__(self) -> Traffic:
        for thread in self._threads:
            thread.start()
        wait_until(lambda: sum(self.seen.values()) + len(self.failures) >= len(self._threads),
                   "the first answers")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    @property
    def total(self) -> int:
        with self._lock:
            return sum(self.seen.values())

    def _run(self, number: int) -> None:
        rng = np.random.default_rng(number)
        last = 0
        with grpcclient.InferenceServerClient(self.url) as client:
            while not self._stop.is_set():
                rows = int(rng.integers(1, 5))
                data = rng.standard_normal((rows, WIDTH)).astype(np.float32)
                tensor = grpcclient.InferInput("INPUT0", [rows, WIDTH], "FP32")
                tensor.set_data_from_numpy(data)
                sent = time.monotonic()
                try:
                    result = client.infer(self.model, [tensor], model_version=self.version)
                except InferenceServerException as exc:
                    with self._lock:
                        self.failures.append(f"thread {number}: {exc}")
                    continue
                received = time.monotonic()
                version = int(result.get_response().model_version)
                problem = self._check(version, data, result.as_numpy("OUTPUT0"), last,
                                      sent, received)
                with self._lock:
                    self.seen[version] += 1
                    if problem:
                        self.wrong.append(f"thread {number}: {problem}")
                last = version
                time.sleep(self.pause_s)

    def _check(self, version: int, data: np.ndarray, out: np.ndarray | None, last: int,
               sent: float, received: float) -> str:
        if self.version and str(version) != self.version:
            return f"asked for version {self.version}, got {version}"
        if out is None or not np.array_equal(out, data * np.float32(self.factor(version))):
            return f"version {version} answered a wrong output"
        if self.monotonic and version < last:
            return f"version went back from {last} to {version}"
        if self.swaps is not None:
            published = self.swaps.published.get(version)
            retired = self.swaps.retired.get(version, float("inf"))
            if published is None or received < published:
                return f"version {version} answered before it was published"
            if sent > retired:
                return f"version {version} answered a request sent after it was retired"
        return ""

    def assert_clean(self) -> None:
        assert not self.failures, f"{len(self.failures)} failed requests: {self.failures[:5]}"
        assert not self.wrong, f"{len(self.wrong)} bad answers: {self.wrong[:5]}"


def swap_to(client: grpcclient.InferenceServerClient, version: int, previous: int,
            swaps: Swaps) -> None:
    """Wait until ``version`` serves and ``previous`` is gone from the index."""
    wait_until(lambda: client.is_model_ready(MODEL, str(version)), f"version {version} ready")
    wait_until(lambda: str(previous) not in versions_in_index(client, MODEL),
               f"version {previous} gone from the index")
    swaps.retired[previous] = time.monotonic()


def one_version_repo(tmp_path: Path, **options: Any) -> Path:
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True, **options)
    return repo


# -- 1, 2, 6: zero-downtime swaps under load ------------------------------------------------


def test_poll_mode_swaps_ten_versions_under_load(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    swaps = Swaps()
    with grpcclient.InferenceServerClient(server.url) as client, \
            Traffic(server.url, swaps=swaps) as traffic:
        for version in range(2, 12):
            before = traffic.total
            swaps.published[version] = time.monotonic()
            # write_version fills a dot-prefixed directory inside the model and renames it.
            model_factory.scaled_model_version(repo, MODEL, version, float(version))
            swap_to(client, version, version - 1, swaps)
            wait_until(lambda before=before: traffic.total > before + 20, "traffic to flow")
        final = index(client)
    traffic.assert_clean()
    assert set(traffic.seen) == set(range(1, 12)), traffic.seen
    assert {v for (m, v) in final if m == MODEL} == {"11"}
    assert final[(MODEL, "11")] == ("READY", "")


def test_explicit_mode_swaps_ten_times_under_load(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode="explicit", load_model=(MODEL,),
                          state_file=tmp_path / "state.json")
    swaps = Swaps()
    with grpcclient.InferenceServerClient(server.url) as client:
        with Traffic(server.url, swaps=swaps) as traffic:
            # Promote by publishing a new version directory, then asking for a load.
            for version in range(2, 7):
                model_factory.scaled_model_version(repo, MODEL, version, float(version))
                if version == 2:
                    time.sleep(3 * POLL_SECS)
                    assert versions_in_index(client, MODEL) == {"1"}  # nobody polls
                swaps.published[version] = time.monotonic()
                client.load_model(MODEL)
                swap_to(client, version, version - 1, swaps)
            # Promote versions already on disk by naming them in a config override.
            for version in range(7, 12):
                model_factory.scaled_model_version(repo, MODEL, version, float(version))
            for version in range(7, 12):
                swaps.published[version] = time.monotonic()
                client.load_model(MODEL, config=override([version]))
                swap_to(client, version, version - 1, swaps)
                before = traffic.total
                wait_until(lambda before=before: traffic.total > before + 20, "traffic to flow")
        traffic.assert_clean()
        assert set(traffic.seen) == set(range(1, 12)), traffic.seen
        # Roll back to version 3 the same way.
        client.load_model(MODEL, config=override([3]))
        assert versions_in_index(client, MODEL) == {"3"}
        assert answers_with_factor(client, "", 3.0)


# -- 2: broken and half-copied versions are rejected ----------------------------------------


def test_broken_version_is_rejected_while_the_old_one_serves(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    with grpcclient.InferenceServerClient(server.url) as client, Traffic(server.url) as traffic:
        model_factory.write_version(repo, MODEL, b"not an onnx model \x00\xff" * 64, 2)
        wait_until(lambda: (MODEL, "2") in index(client), "version 2 in the index")
        before = traffic.total
        wait_until(lambda: traffic.total > before + 50, "traffic after the failed swap")
        state, reason = index(client)[(MODEL, "2")]
        assert state == "UNAVAILABLE"
        assert "2/model.onnx" in reason and "could not load" in reason
        assert index(client)[(MODEL, "1")] == ("READY", "")
        assert not client.is_model_ready(MODEL, "2")
    traffic.assert_clean()
    assert set(traffic.seen) == {1}
    failures = [line for line in metrics_text(server).splitlines()
                if line.startswith("peregrine_model_load_failures_total{")
                and f'model="{MODEL}"' in line]
    assert failures, "no peregrine_model_load_failures_total sample for the model"
    assert any('version="2"' in line and float(line.rsplit(" ", 1)[1]) >= 1 for line in failures)


def test_explicit_load_of_a_broken_version_fails_and_the_old_one_serves(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode="explicit", load_model=(MODEL,),
                          state_file=tmp_path / "state.json")
    with grpcclient.InferenceServerClient(server.url) as client, Traffic(server.url) as traffic:
        model_factory.write_version(repo, MODEL, b"garbage", 2)
        with pytest.raises(InferenceServerException) as err:
            client.load_model(MODEL)
        message = str(err.value)
        assert "version 2" in message and "2/model.onnx" in message, message
        assert f"load failed for model '{MODEL}': " in message
        assert "its serving versions are kept" in message
        before = traffic.total
        wait_until(lambda: traffic.total > before + 20, "traffic after the failed load")
        assert index(client)[(MODEL, "2")][0] == "UNAVAILABLE"
        assert client.is_model_ready(MODEL, "1")
    traffic.assert_clean()
    assert set(traffic.seen) == {1}


def test_half_copied_version_is_loaded_once_its_model_file_arrives(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    staging = tmp_path / "staging"
    model_factory.scaled_model_version(staging, MODEL, 2, 2.0)
    with grpcclient.InferenceServerClient(server.url) as client, \
            Traffic(server.url) as traffic:
        (repo / MODEL / "2").mkdir()  # a copy that has not got to model.onnx yet
        wait_until(lambda: index(client).get((MODEL, "2"), ("LOADING",))[0] != "LOADING",
                   "version 2's load attempt over")
        state, reason = index(client)[(MODEL, "2")]
        assert state == "UNAVAILABLE"
        assert "model.onnx" in reason and "missing" in reason, reason
        assert client.is_model_ready(MODEL, "1")
        os.rename(staging / MODEL / "2" / "model.onnx", repo / MODEL / "2" / "model.onnx")
        wait_until(lambda: client.is_model_ready(MODEL, "2"), "version 2 ready")
        wait_until(lambda: versions_in_index(client, MODEL) == {"2"}, "version 1 retired")
        before = traffic.total
        wait_until(lambda: traffic.total > before + 20, "traffic after the swap")
    traffic.assert_clean()
    assert set(traffic.seen) == {1, 2}


# -- 1, 2: removal ---------------------------------------------------------------------------


def test_removed_version_unloads_after_its_requests_finish(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = tmp_path / "repo"
    # About 60 ms per request, one at a time: a queue of requests stays in flight while the
    # poller notices the removal.
    for version in (1, 2):
        model_factory.slow_model(repo, "slow", delay_ms=60, max_batch_size=1, version=version,
                                 version_policy="all { }")
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    data = np.random.default_rng(0).standard_normal((1, model_factory.SLOW_WIDTH))
    data = data.astype(np.float32)
    expected = model_factory.slow_model_expected(data, 60)
    results: list[tuple[float, Any]] = []
    done = threading.Event()
    count = 12

    def callback(result: Any, error: InferenceServerException | None) -> None:
        results.append((time.monotonic(), error if error is not None else result))
        if len(results) == count:
            done.set()

    with grpcclient.InferenceServerClient(server.url) as client:
        tensor = grpcclient.InferInput("INPUT0", [1, model_factory.SLOW_WIDTH], "FP32")
        tensor.set_data_from_numpy(data)
        for _ in range(count):
            client.async_infer("slow", [tensor], callback, model_version="1")
        wait_until(lambda: len(results) >= 1, "the first answer")
        hidden = repo / "slow" / ".removed-1"
        os.rename(repo / "slow" / "1", hidden)  # atomic retirement: rename away, then delete
        shutil.rmtree(hidden)
        wait_until(lambda: versions_in_index(client, "slow") == {"2"}, "version 1 retired")
        retired_at = time.monotonic()
        assert not client.is_model_ready("slow", "1")
        assert done.wait(60), "the queued requests did not finish"
        with pytest.raises(InferenceServerException) as err:
            client.infer("slow", [tensor], model_version="1")
        assert "Request for unknown model: 'slow' version 1 is not found" in str(err.value)
        assert client.is_model_ready("slow", "2")
    errors = [r for _, r in results if isinstance(r, InferenceServerException)]
    assert not errors, errors
    for _, result in results:
        assert result.get_response().model_version == "1"
        assert np.array_equal(result.as_numpy("OUTPUT0"), expected)
    # Some of them were still queued when the version left the index: they were drained.
    assert max(at for at, _ in results) > retired_at


def test_removed_model_unloads(tmp_path: Path, start_server: StartServer) -> None:
    repo = one_version_repo(tmp_path)
    model_factory.scaled_model_version(repo, "other", 1, 5.0, with_config=True)
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready("other")
        hidden = repo / ".removed-other"
        os.rename(repo / "other", hidden)
        shutil.rmtree(hidden)
        wait_until(lambda: not any(m == "other" for m, _ in index(client)), "model gone")
        assert not client.is_model_ready("other")
        with pytest.raises(InferenceServerException) as err:
            infer(client, "other")
        assert "Request for unknown model: 'other' is not found" in str(err.value)
        assert client.is_model_ready(MODEL)


# -- 2: explicit version requests ------------------------------------------------------------


def test_requests_naming_a_version_get_exactly_that_version(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True,
                                       version_policy="all { }")
    model_factory.scaled_model_version(repo, MODEL, 2, 2.0)
    server = start_server(repo, model_control_mode="poll", repository_poll_secs=POLL_SECS)
    with grpcclient.InferenceServerClient(server.url) as client, \
            Traffic(server.url, threads=2, version="1") as one, \
            Traffic(server.url, threads=1, version="2") as two:
        assert infer(client)[0] == 2  # policy "all": latest is the highest version
        model_factory.scaled_model_version(repo, MODEL, 3, 3.0)
        wait_until(lambda: client.is_model_ready(MODEL, "3"), "version 3 ready")
        wait_until(lambda: infer(client)[0] == 3, "latest to move to version 3")
        before = one.total + two.total
        wait_until(lambda: one.total + two.total > before + 20, "traffic after the new version")
        assert versions_in_index(client, MODEL) == {"1", "2", "3"}
    for traffic, version in ((one, 1), (two, 2)):
        traffic.assert_clean()
        assert set(traffic.seen) == {version}


# -- 4: model cards --------------------------------------------------------------------------

CARD = {
    "training_data": {"name": "digits", "version": "2024-05-01"},
    "hyperparameters": {"learning_rate": 0.01, "hidden": [64, 32], "early_stopping": True},
    "metrics": {"accuracy": 0.97},
    "code_revision": "abc1234",
}


def test_model_card_appears_in_metadata_config_and_cli(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True,
                                       version_policy="all { }",
                                       extra_files={"model_card.json": json.dumps(CARD).encode()})
    model_factory.scaled_model_version(repo, MODEL, 2, 2.0,
                                       extra_files={"model_card.json": b"{ not json"})
    model_factory.scaled_model_version(repo, MODEL, 3, 3.0)  # no card: fine
    server = start_server(repo, strict_readiness=False)
    expected = {
        "card.training_data.name": "digits",
        "card.training_data.version": "2024-05-01",
        "card.hyperparameters.learning_rate": "0.01",
        "card.hyperparameters.hidden": "[64, 32]",
        "card.hyperparameters.early_stopping": "true",
        "card.metrics.accuracy": "0.97",
        "card.code_revision": "abc1234",
    }
    with pb_stub(server.url) as stub:
        metadata = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="1"))
        assert dict(metadata.properties) == expected
        config = stub.ModelConfig(pb.ModelConfigRequest(name=MODEL, version="1")).config
        assert {k: v.string_value for k, v in config.parameters.items()
                if k.startswith("card.")} == expected
        latest = stub.ModelMetadata(pb.ModelMetadataRequest(name=MODEL, version="3"))
        assert dict(latest.properties) == {}
    with grpcclient.InferenceServerClient(server.url) as client:
        state, reason = index(client)[(MODEL, "2")]
        assert state == "UNAVAILABLE"
        assert "model_card.json" in reason and "malformed" in reason, reason
        assert client.is_model_ready(MODEL, "1") and client.is_model_ready(MODEL, "3")
    shown = repo_cli(server.url, "index", "--verbose")
    assert shown.returncode == 0, shown.stderr
    assert "card.code_revision = abc1234" in shown.stdout
    assert "card.training_data.version = 2024-05-01" in shown.stdout
    assert "model_card.json" in shown.stdout  # the reason version 2 is not served


# -- 5: durability ---------------------------------------------------------------------------


def test_explicit_load_set_survives_a_restart(tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, "a", 1, 1.0, with_config=True)
    model_factory.scaled_model_version(repo, "b", 1, 1.0, with_config=True)
    settings: dict[str, Any] = {"model_control_mode": "explicit",
                                "state_file": tmp_path / "state" / "state.json"}
    with ServerThread(repo, **settings) as first, \
            grpcclient.InferenceServerClient(first.url) as client:
        assert not client.is_model_ready("a") and not client.is_model_ready("b")
        client.load_model("a")
        client.load_model("b")
        client.unload_model("b")
    state = json.loads(settings["state_file"].read_text())
    assert state["explicit_models"] == ["a"]
    with ServerThread(repo, **settings) as second, \
            grpcclient.InferenceServerClient(second.url) as client:
        assert client.is_model_ready("a")
        assert not client.is_model_ready("b")
        assert index(client)[("b", "")] == ("UNAVAILABLE", "not loaded")
    assert not list(settings["state_file"].parent.glob(".state-*")), "temporary files left"


def test_crash_mid_swap_comes_back_on_the_last_good_version(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    model_factory.write_version(repo, MODEL, b"half-written engine", 2)
    state_file = tmp_path / "state.json"
    # What the state file says when the process died while version 2 was loading.
    state_file.write_text(json.dumps({"explicit_models": [], "last_good": {MODEL: [1]}}))
    server = start_server(repo, model_control_mode="none", state_file=state_file,
                          strict_readiness=False)
    with grpcclient.InferenceServerClient(server.url) as client:
        assert client.is_model_ready(MODEL, "1")
        assert answers_with_factor(client, "", 1.0)
        state, reason = index(client)[(MODEL, "2")]
        assert state == "UNAVAILABLE"
        assert "2/model.onnx" in reason and "last good" in reason, reason
    assert json.loads(state_file.read_text())["last_good"] == {MODEL: [1]}


# -- 2, 6: memory ----------------------------------------------------------------------------


def _rss_mb() -> float:
    gc.collect()
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def _scaled_answer(client: grpcclient.InferenceServerClient, model: str,
                   factor: float) -> tuple[np.ndarray, np.ndarray]:
    _, data, out = infer(client, model)
    return out, data * np.float32(factor)


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc")
def test_memory_returns_to_baseline_after_unloads(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = tmp_path / "repo"
    weights_mb = 8.0
    model_factory.scaled_model_version(repo, "heavy", 1, 1.0, with_config=True,
                                       weights_mb=weights_mb)
    server = start_server(repo, model_control_mode="explicit",
                          state_file=tmp_path / "state.json")

    with grpcclient.InferenceServerClient(server.url) as client:
        def cycle() -> None:
            client.load_model("heavy")
            assert np.array_equal(*_scaled_answer(client, "heavy", 1.0))
            client.unload_model("heavy")

        for _ in range(2):  # warm-up: first-time allocations (arenas, caches, code paths)
            cycle()
        baseline = _rss_mb()
        client.load_model("heavy")
        loaded = _rss_mb()
        client.unload_model("heavy")
        for _ in range(20):
            cycle()
        after = _rss_mb()
    # 20 leaked versions would hold 20 * 8 MB of weights; the allocator may keep a little.
    assert after - baseline < 40, (
        f"RSS {baseline:.0f} MB -> {after:.0f} MB after 20 cycles (loaded: {loaded:.0f} MB)"
    )


# -- 1: model-control RPCs and `peregrine repo` ----------------------------------------------


@pytest.mark.parametrize("mode", ["none", "poll"])
def test_load_and_unload_need_explicit_mode(
    mode: str, tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    server = start_server(repo, model_control_mode=mode)
    with grpcclient.InferenceServerClient(server.url) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as err:
                call(MODEL)
            assert err.value.status() == "StatusCode.FAILED_PRECONDITION"
            assert "--model-control-mode explicit" in str(err.value)
        assert client.is_model_ready(MODEL)


def test_unknown_model_is_not_found(tmp_path: Path, start_server: StartServer) -> None:
    server = start_server(one_version_repo(tmp_path), model_control_mode="explicit",
                          state_file=tmp_path / "state.json")
    with grpcclient.InferenceServerClient(server.url) as client:
        for call in (client.load_model, client.unload_model):
            with pytest.raises(InferenceServerException) as err:
                call("nope")
            assert err.value.status() == "StatusCode.NOT_FOUND"
            assert "nope" in str(err.value)


def test_repo_commands_against_an_explicit_server(
    tmp_path: Path, start_server: StartServer
) -> None:
    repo = one_version_repo(tmp_path)
    model_factory.scaled_model_version(repo, MODEL, 2, 2.0)
    server = start_server(repo, model_control_mode="explicit",
                          state_file=tmp_path / "state.json")
    listed = repo_cli(server.url, "index")
    assert listed.returncode == 0, listed.stderr
    assert MODEL in listed.stdout and "not loaded" in listed.stdout

    loaded = repo_cli(server.url, "load", MODEL, "--config", override([1]))
    assert loaded.returncode == 0, loaded.stderr
    assert f"loaded {MODEL}" in loaded.stdout
    listed = repo_cli(server.url, "index")
    assert any(line.split()[:3] == [MODEL, "1", "READY"] for line in listed.stdout.splitlines())

    with grpcclient.InferenceServerClient(server.url) as client:
        assert answers_with_factor(client, "1", 1.0)
        promoted = repo_cli(server.url, "load", MODEL)  # back to config.pbtxt: latest = 2
        assert promoted.returncode == 0, promoted.stderr
        assert versions_in_index(client, MODEL) == {"2"}
        assert answers_with_factor(client, "", 2.0)

        bad = repo_cli(server.url, "load", MODEL, "--config", "{not json")
        assert bad.returncode == 2 and "not JSON" in bad.stderr
        missing = repo_cli(server.url, "load", "nope")
        assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr

        unloaded = repo_cli(server.url, "unload", MODEL)
        assert unloaded.returncode == 0, unloaded.stderr
        assert not client.is_model_ready(MODEL)
