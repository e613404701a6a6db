"""The integration suite twice more, side by side: with the pure-Python path
(PEREGRINE_NATIVE=0: the protobuf runtime parses and writes the messages, numpy packs the
batches) and with two frontend processes in front of the engine (PEREGRINE_FRONTENDS=2:
every in-thread test server and every `peregrine serve` the tests start). Every conformance
and integration test passes on the native and the pure-Python path, and across the process
boundary too.

The two reruns start together (each is one pytest process, mostly waiting on its servers),
which keeps the whole suite within its time on two cores.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest

from tests.server_harness import RERUN

ROOT = Path(__file__).resolve().parents[2]
RERUNS = {
    "native_code_off": {"PEREGRINE_NATIVE": "0"},
    "two_frontend_processes": {"PEREGRINE_FRONTENDS": "2"},
}
TIMEOUT_S = 1300

pytestmark = pytest.mark.skipif(RERUN, reason="this is a rerun of the suite itself")


@pytest.fixture(scope="module")
def reruns() -> Iterator[dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]]]:
    started: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]] = {}
    with contextlib.ExitStack() as stack:
        for name, env in RERUNS.items():
            output = stack.enter_context(tempfile.TemporaryFile())
            process = stack.enter_context(subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                 "tests/integration"],
                cwd=ROOT, env={**os.environ, **env}, stdout=output, stderr=subprocess.STDOUT))
            stack.callback(_kill_if_running, process)
            started[name] = (process, output)
        yield started


def _kill_if_running(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.mark.parametrize("name", RERUNS)
@pytest.mark.timeout(TIMEOUT_S + 60)
def test_the_integration_suite_passes(
    name: str, reruns: dict[str, tuple[subprocess.Popen[bytes], IO[bytes]]]
) -> None:
    process, output = reruns[name]
    returncode = process.wait(timeout=TIMEOUT_S)
    output.seek(0)
    text = output.read().decode(errors="replace")
    assert returncode == 0, text[-10000:]
    assert " passed" in text.strip().splitlines()[-1]
