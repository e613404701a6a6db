"""The integration suite once more with two frontend processes in front of the engine
(PEREGRINE_FRONTENDS=2: every in-thread test server and every `peregrine serve` the tests
start): every conformance and integration test passes across the process boundary too."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NESTED = int(os.environ.get("PEREGRINE_FRONTENDS", "1")) > 1 \
    or os.environ.get("PEREGRINE_NATIVE") == "0"


@pytest.mark.skipif(NESTED, reason="this is a rerun of the suite itself")
@pytest.mark.timeout(1200)
def test_the_integration_suite_passes_with_two_frontend_processes() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/integration"],
        cwd=ROOT, env={**os.environ, "PEREGRINE_FRONTENDS": "2"}, capture_output=True,
        text=True, timeout=1150, check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
