"""``peregrine bench`` as a new user meets it: the real entry point (server.cli.main), the load
tester found beside server/ in the checkout, and missing optional packages reported in one
line naming the extra instead of a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import server
from bench.loadgen.schema import validate_run
from server.cli import main as peregrine
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]

#: `peregrine bench ...` in a fresh interpreter whose sys.path has neither the checkout nor
#: matplotlib: only `server` (a link to this checkout's), as after `pip install -e .` without
#: the bench extra. It prints where `bench` was imported from.
WITHOUT_MATPLOTLIB = """
import sys
sys.modules["matplotlib"] = None
from server.cli import main
code = main(sys.argv[1:])
print(sys.modules["bench"].__file__)
sys.exit(code)
"""


@pytest.fixture(scope="module")
def examples_server(examples_repo: Path) -> Iterator[ServerThread]:
    with ServerThread(examples_repo) as running:
        yield running


def test_bench_run_works_without_the_bench_extra(examples_server: ServerThread,
                                                 tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "server").symlink_to(ROOT / "server", target_is_directory=True)
    out = tmp_path / "run.json"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", WITHOUT_MATPLOTLIB, "bench", "run", "--url", examples_server.url,
         "-m", "mlp_classifier", "-c", "2", "-d", "0.5", "--warmup", "0.2", "--progress",
         "never", "--json", str(out)],
        cwd=elsewhere, env=env, capture_output=True, text=True, timeout=90, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.splitlines()[-1]) == ROOT / "bench" / "__init__.py"
    assert "infer/s" in done.stdout  # the table
    [note] = [line for line in done.stderr.splitlines() if line.strip()]
    assert "matplotlib" in note and "'bench' extra" in note
    document = json.loads(out.read_text())
    validate_run(document)
    [step] = document["steps"]
    assert step["ok"] > 0 and step["errors"] == {}
    assert step["sent"] == step["ok"]
    assert not out.with_suffix(".png").exists()


def test_compare_without_matplotlib_names_the_extra(monkeypatch: pytest.MonkeyPatch,
                                                    tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    for name in ("bench.loadgen.plots", "bench.loadgen.compare_runs"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    run = tmp_path / "a.json"
    run.write_text("{}")
    assert peregrine(["bench", "compare", str(run), str(run)]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "matplotlib" in line and "'bench' extra" in line


def test_outside_a_checkout_bench_says_so_in_one_line(monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    # As from a wheel: the server package has no bench/ beside it.
    monkeypatch.setattr(server, "__file__", str(tmp_path / "server" / "__init__.py"))
    assert peregrine(["bench", "run", "-m", "mlp_classifier"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert "source checkout" in line
