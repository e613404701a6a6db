"""Shared fixtures: model repositories built by tests/model_factory.py and live servers."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests import model_factory
from tests.server_harness import ServerThread


@pytest.fixture(scope="session")
def standard_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Identity models of every datatype, add_sub, a no-batch model and a broken one."""
    repo = tmp_path_factory.mktemp("repo")
    model_factory.identity_models(repo, max_batch_size=8)
    model_factory.add_sub_model(repo, "add_sub", max_queue_delay_microseconds=0)
    model_factory.no_batch_model(repo, "no_batch")
    model_factory.broken_model(repo, "broken")
    return repo


@pytest.fixture(scope="session")
def examples_repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example repository, built once per run by examples/build_models.py (a fresh clone
    has no examples/models: it is built by the install command, never committed)."""
    root = Path(__file__).resolve().parent.parent
    out = tmp_path_factory.mktemp("examples") / "models"
    subprocess.run(
        [sys.executable, str(root / "examples" / "build_models.py"), "--out", str(out)],
        check=True, capture_output=True, timeout=180, cwd=root,
    )
    return out


@pytest.fixture(scope="session")
def standard_server(standard_repo: Path) -> Iterator[ServerThread]:
    """One server shared by the read-only end-to-end tests (strict readiness off: 'broken')."""
    with ServerThread(standard_repo, strict_readiness=False) as running:
        yield running


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerThread]]:
    """Start a server on a repository of the test's own; stopped at the end of the test."""
    started: list[ServerThread] = []

    def start(repository: Path, **overrides: Any) -> ServerThread:
        running = ServerThread(repository, **overrides).start()
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()
