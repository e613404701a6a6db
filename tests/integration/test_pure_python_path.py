"""The integration suite once more with PEREGRINE_NATIVE=0: every conformance and
integration test passes on the pure-Python path too (the protobuf runtime parses and writes
the messages, numpy packs the batches), not only on the native codec and packing."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NESTED = os.environ.get("PEREGRINE_NATIVE") == "0"
#: The run with frontend processes (tests/integration/test_frontends_mode.py).
WITH_FRONTENDS = int(os.environ.get("PEREGRINE_FRONTENDS", "1")) > 1


@pytest.mark.skipif(NESTED, reason="this is the pure-Python run itself")
@pytest.mark.skipif(WITH_FRONTENDS, reason="this is the run with frontends")
@pytest.mark.timeout(1200)
def test_the_integration_suite_passes_with_native_code_off() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
         "tests/integration"],
        cwd=ROOT, env={**os.environ, "PEREGRINE_NATIVE": "0"}, capture_output=True, text=True,
        timeout=1150, check=False,
    )
    assert result.returncode == 0, result.stdout[-8000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]
