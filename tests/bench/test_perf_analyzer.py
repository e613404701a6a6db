"""bench/studies/perf_analyzer.py and the no-op server's model descriptions, without the binary:
the input file it is given, the CSV it writes, and the metadata it needs from the floor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bench.compare.noop_server import describe, read_configs
from bench.studies.perf_analyzer import find, input_json, parse_csv
from tests import model_factory


def test_input_json_drops_the_batch_dim_and_keeps_values(tmp_path: Path) -> None:
    x = np.arange(12, dtype=np.float32).reshape(1, 3, 4)
    np.savez(tmp_path / "m.npz", image=x)
    data = json.loads(input_json(tmp_path / "m.npz", tmp_path / "m.json").read_text())
    (request,) = data["data"]
    assert request["image"]["shape"] == [3, 4]
    assert request["image"]["content"] == x.reshape(-1).tolist()


def test_parse_csv_reads_the_measured_row(tmp_path: Path) -> None:
    report = tmp_path / "step.csv"
    report.write_text("Concurrency,Inferences/Second,Client Send,Client Recv,p50 latency,"
                      "p90 latency,p95 latency,p99 latency\n64,13580.7,0,0,4638,5062,5244,6227\n")
    row = parse_csv(report)
    assert row["Inferences/Second"] == 13580.7
    assert row["p50 latency"] == 4638 and row["p99 latency"] == 6227
    report.write_text("Concurrency,Inferences/Second\n")
    with pytest.raises(RuntimeError, match="no measurement"):
        parse_csv(report)


def test_find_honours_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERF_ANALYZER", str(tmp_path / "pa"))
    assert find() == tmp_path / "pa"


def test_noop_server_describes_a_repository_as_metadata(tmp_path: Path) -> None:
    model_factory.add_sub_model(tmp_path, "add_sub", max_batch_size=8)
    configs = read_configs(tmp_path)
    assert set(configs) == {"add_sub"}
    metadata = describe(configs["add_sub"])
    assert metadata.name == "add_sub"
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == [
        ("INPUT0", "FP32", [-1, 16]), ("INPUT1", "FP32", [-1, 16])]
    assert [t.name for t in metadata.outputs] == ["OUTPUT0", "OUTPUT1"]
    assert read_configs(None) == {}
