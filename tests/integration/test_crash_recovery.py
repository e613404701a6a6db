"""A `peregrine serve` killed with SIGKILL in the middle of a hot swap (issue: overload and
faults): the state file still names the last good version, whole (it is replaced atomically)
and alone (no temporary file left beside it), with the versions whose load was under way, and
the restart serves the last good version.

The swap is held open by a version whose warm-up spins a loop for a second or two
(:func:`tests.model_factory.stalling_scaled_version`); the kill lands while RepositoryIndex
shows it LOADING and version 1 still answers. At restart the server serves the last good
versions the state file recorded, whatever version 2 would do (its load may be what killed the
last run), and loads version 2 again once its files change.
"""

from __future__ import annotations

import contextlib
import json
import signal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.integration.test_cli import Served, environment, free_port
from tests.integration.test_lifecycle import (
    MODEL,
    POLL_SECS,
    answers_with_factor,
    index,
    infer,
    versions_in_index,
    wait_until,
)

#: Loop trips of version 2's warm-up: about 0.8 s on the 2-core development machine, ample
#: to see it LOADING (RepositoryIndex is polled every 20 ms) and kill the server before it ends.
STALL_TRIPS = 40_000


@contextlib.contextmanager
def serving(
    repo: Path, state_file: Path,
) -> Iterator[tuple[Served, grpcclient.InferenceServerClient]]:
    """A poll-mode `peregrine serve` subprocess, started, and a client on it."""
    port = free_port()
    server = Served(["--model-repository", str(repo), "--grpc-port", str(port),
                     "--allow-metrics", "false", "--log-format", "json",
                     "--model-control-mode", "poll", "--repository-poll-secs", str(POLL_SECS),
                     "--state-file", str(state_file)], environment())
    try:
        server.wait_for_event("server started")
        with grpcclient.InferenceServerClient(f"127.0.0.1:{port}") as client:
            yield server, client
    finally:
        server.stop()


def state(state_file: Path) -> Any:
    return json.loads(state_file.read_text(encoding="utf-8"))


def assert_intact(state_file: Path, last_good: list[int],
                  loading: list[int] | None = None) -> None:
    """The state file parses whole, says ``last_good`` for the model (and the versions whose
    load was under way, if any), and is alone in its directory: no temporary file of a write
    cut short."""
    expected: dict[str, Any] = {"explicit_models": [], "last_good": {MODEL: last_good}}
    if loading is not None:
        expected["loading"] = {MODEL: loading}
    assert state(state_file) == expected
    assert [p.name for p in state_file.parent.iterdir()] == [state_file.name]


def kill_mid_swap(tmp_path: Path, broken: bool) -> tuple[Path, Path]:
    """Serve version 1, publish a slow-warming version 2 (``broken``: failing after its
    spin), SIGKILL the server while version 2 loads. Returns the repository and state file."""
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True, warmup_count=1)
    state_file = tmp_path / "state" / "state.json"
    with serving(repo, state_file) as (server, client):
        wait_until(lambda: state_file.exists() and state(state_file)["last_good"] == {MODEL: [1]},
                   "version 1 recorded as last good")
        model_factory.stalling_scaled_version(repo, MODEL, 2, 2.0, STALL_TRIPS, broken=broken)
        wait_until(lambda: index(client).get((MODEL, "2"), ("",))[0] == "LOADING",
                   "version 2 loading")
        # The index says LOADING as soon as the load is planned; the load itself begins once
        # the state file records it, so the kill waits for that record.
        wait_until(lambda: state(state_file).get("loading") == {MODEL: [2]},
                   "version 2's load recorded in the state file")
        assert infer(client)[0] == 1  # mid-swap: version 1 still serves
        server.proc.send_signal(signal.SIGKILL)
        assert server.proc.wait(timeout=10) == -signal.SIGKILL
    assert_intact(state_file, [1], loading=[2])
    # The server wrote nothing into the repository.
    assert sorted(p.name for p in repo.iterdir()) == [MODEL]
    assert sorted(p.name for p in (repo / MODEL).iterdir()) == ["1", "2", "config.pbtxt"]
    return repo, state_file


def assert_refused(client: grpcclient.InferenceServerClient, version: str) -> None:
    with pytest.raises(InferenceServerException) as refused:
        infer(client, version=version)
    assert refused.value.status() == "StatusCode.UNAVAILABLE", refused.value


def test_a_kill_mid_swap_to_a_broken_version_restarts_on_the_last_good(
    tmp_path: Path,
) -> None:
    repo, state_file = kill_mid_swap(tmp_path, broken=True)
    with serving(repo, state_file) as (_, client):
        assert client.is_model_ready(MODEL, "1")
        assert not client.is_model_ready(MODEL, "2")
        assert infer(client)[0] == 1
        assert answers_with_factor(client, "", 1.0)
        assert_interrupted(client)
    assert_intact(state_file, [1])


def assert_interrupted(client: grpcclient.InferenceServerClient) -> None:
    state_2, reason = index(client)[(MODEL, "2")]
    assert state_2 == "UNAVAILABLE"
    assert "load was interrupted" in reason and "last good versions ['1']" in reason, reason
    assert_refused(client, "2")


def test_a_kill_mid_swap_to_a_sound_version_restarts_on_the_last_good_then_swaps_on_change(
    tmp_path: Path,
) -> None:
    repo, state_file = kill_mid_swap(tmp_path, broken=False)
    with serving(repo, state_file) as (_, client):
        assert infer(client)[0] == 1
        assert answers_with_factor(client, "", 1.0)
        assert_interrupted(client)
        # A change to the model's files is the cue to try version 2 again.
        model_file = repo / MODEL / "2" / "model.onnx"
        model_file.write_bytes(model_file.read_bytes())
        wait_until(lambda: versions_in_index(client, MODEL) == {"2"}, "version 2 swapped in",
                   timeout=60)
        assert infer(client)[0] == 2
        wait_until(lambda: state(state_file)["last_good"] == {MODEL: [2]},
                   "version 2 recorded as last good")
    assert_intact(state_file, [2])


def test_a_broken_version_is_never_served_after_a_clean_restart(tmp_path: Path) -> None:
    """Version 2 fails to load while version 1 serves; the server is stopped with SIGTERM
    (the killed case is the test above)."""
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True)
    state_file = tmp_path / "state" / "state.json"
    with serving(repo, state_file) as (server, client):
        model_factory.write_version(repo, MODEL, b"not an onnx model \x00\xff" * 64, 2)
        wait_until(lambda: index(client).get((MODEL, "2"), ("",))[0] == "UNAVAILABLE",
                   "version 2 rejected")
        assert infer(client)[0] == 1
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(timeout=15) == 0
    assert_intact(state_file, [1])
    with serving(repo, state_file) as (_, client):
        assert infer(client)[0] == 1
        assert answers_with_factor(client, "", 1.0)
        state_2, reason = index(client)[(MODEL, "2")]
        assert state_2 == "UNAVAILABLE"
        assert "2/model.onnx" in reason and "last good versions ['1']" in reason, reason
        assert_refused(client, "2")
    assert_intact(state_file, [1])
