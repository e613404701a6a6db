"""The load generator against a real Peregrine server: every request is accounted for.

Closed and open loop, unary and streaming, one and two generator processes, and a run where
every request fails. No timing is asserted: only that sent = ok + errors, that answers came,
and that the documents follow the schema.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.loadgen.cli import main as bench_main
from bench.loadgen.runner import RunConfig, run
from bench.loadgen.schema import validate_run
from tests import model_factory
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(120)

SHORT = {"duration_s": 0.6, "warmup_s": 0.2}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    repo = tmp_path_factory.mktemp("bench_repo")
    model_factory.add_sub_model(repo, "add_sub", max_queue_delay_microseconds=100)
    with ServerThread(repo) as running:
        yield running


def accounted(document: dict[str, Any]) -> list[dict[str, Any]]:
    validate_run(document)
    for step in document["steps"]:
        assert step["sent"] == step["ok"] + sum(step["errors"].values()), step
        assert step["sent"] > 0
    return list(document["steps"])


@pytest.mark.parametrize(("rpc", "processes"), [("unary", 2), ("stream", 1)])
def test_closed_loop_counts_add_up(server: ServerThread, rpc: str, processes: int) -> None:
    document = run(RunConfig(url=server.url, model="add_sub", rpc=rpc, concurrency=(1, 4),
                             processes=processes, **SHORT), command=[])  # type: ignore[arg-type]
    steps = accounted(document)
    assert [s["concurrency"] for s in steps] == [1, 4]
    for step in steps:
        assert step["errors"] == {}
        assert step["ok"] > 0 and step["throughput_rps"] > 0
        assert step["latency_ms"]["p50"] > 0
        assert step["server_split"] is not None  # Peregrine answers ModelStatistics
        assert step["server_split"]["requests"] > 0
    tensors = document["inputs"]["request"]["tensors"]
    assert [(t["name"], t["shape"]) for t in tensors] == [("INPUT0", [1, 16]),
                                                          ("INPUT1", [1, 16])]


@pytest.mark.parametrize("rpc", ["unary", "stream"])
def test_open_loop_counts_add_up(server: ServerThread, rpc: str) -> None:
    document = run(RunConfig(url=server.url, model="add_sub", rpc=rpc, rates=(200.0,),
                             arrival="constant", **SHORT), command=[])  # type: ignore[arg-type]
    [step] = accounted(document)
    assert step["rate"] == 200.0 and step["concurrency"] is None
    assert step["errors"] == {}
    assert 100 <= step["sent"] <= 150  # 0.6 s at 200/s, give or take an arrival
    assert step["send_lag_ms"] is not None


def test_request_count_mode(server: ServerThread) -> None:
    document = run(RunConfig(url=server.url, model="add_sub", concurrency=(3,),
                             duration_s=None, requests=50, warmup_s=0.2), command=[])
    [step] = accounted(document)
    assert step["sent"] == 50 and step["ok"] == 50


def test_failures_are_counted_by_status(server: ServerThread, tmp_path: Path) -> None:
    # Rows of 8 values where the model wants 16: every request is INVALID_ARGUMENT.
    data = tmp_path / "bad.npz"
    np.savez(data, INPUT0=np.zeros((1, 8), np.float32), INPUT1=np.zeros((1, 8), np.float32))
    for rpc in ("unary", "stream"):
        document = run(RunConfig(url=server.url, model="add_sub", rpc=rpc, concurrency=(2,),
                                 input_file=data, **SHORT), command=[])  # type: ignore[arg-type]
        [step] = accounted(document)
        assert step["ok"] == 0
        assert set(step["errors"]) == {"INVALID_ARGUMENT"}, step["errors"]


@pytest.fixture(scope="module")
def cli_runs(server: ServerThread, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Two runs through the command line: unary with its chart, streaming without."""
    folder = tmp_path_factory.mktemp("cli_runs")
    paths = []
    for rpc, extra in (("unary", []), ("stream", ["--no-plot", "-q"])):
        path = folder / f"{rpc}.json"
        code = bench_main(["run", "--url", server.url, "-m", "add_sub", "--rpc", rpc, "-c", "2",
                           "-d", "0.5", "--warmup", "0.2", "--json", str(path), *extra])
        assert code == 0
        paths.append(path)
    return paths


def test_cli_writes_json_and_png(cli_runs: list[Path]) -> None:
    for path in cli_runs:
        accounted(json.loads(path.read_text()))
    assert cli_runs[0].with_suffix(".png").stat().st_size > 1000
    assert not cli_runs[1].with_suffix(".png").exists()


def test_compare_two_real_runs(cli_runs: list[Path], tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    assert bench_main(["compare", *map(str, cli_runs), "--plot", str(tmp_path / "cmp.png")]) == 0
    assert "ratio" in capsys.readouterr().out
    assert (tmp_path / "cmp.png").is_file()
