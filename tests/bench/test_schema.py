"""The run document's layout: a valid one passes, each kind of damage is named."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen.compare_runs import compare
from bench.loadgen.histogram import LatencyHistogram
from bench.loadgen.schema import SCHEMA, SchemaError, problems_of, validate_run


def sample_step(concurrency: int, throughput: float) -> dict[str, Any]:
    histogram = LatencyHistogram()
    histogram.record_many([200_000, 300_000, 400_000 * concurrency])
    latency = histogram.summary_ms()
    return {
        "concurrency": concurrency, "rate": None, "throughput_rps": throughput,
        "samples_per_s": throughput, "sent": 3, "ok": 3, "errors": {}, "window_s": 1.0,
        "latency_ms": latency, "histogram": histogram.encode(), "send_lag_ms": None,
        "client_cpu": {"percent": 40.0, "us_per_request": 100.0}, "server_cpu": None,
        "server_split": None, "bound": "unknown",
        "repeats": [{"throughput_rps": throughput, "p50_ms": latency["p50"],
                     "p99_ms": latency["p99"]}],
    }


def sample_run(label: str = "a", scale: float = 1.0) -> dict[str, Any]:
    return {
        "schema": SCHEMA, "kind": "run", "created": "2026-11-25T00:00:00+00:00",
        "command": ["peregrine", "bench", "run"],
        "inputs": {
            "url": "127.0.0.1:8001", "model": "m", "version": "", "rpc": "unary",
            "mode": "closed", "sweep": "concurrency", "concurrency": [1, 8], "rates": [],
            "arrival": "poisson", "max_inflight": 1024, "duration_s": 1.0, "requests": None,
            "warmup_s": 0.5, "repeats": 1, "processes": 1, "batch_size": 1, "shapes": {},
            "input_file": None, "seed": 0, "label": label,
            "request": {"tensors": [], "rows": 1, "bytes": 100},
        },
        "server": {"url": "127.0.0.1:8001", "pid": None, "metadata": None},
        "environment": {
            "packages": {}, "machine": {"cpu_model": "x", "nproc": 2, "cpu_count": 2},
            "git_revision": "abc", "pinning": {"generator_cpus": [1], "server_cpus": None},
        },
        "steps": [sample_step(1, 1000.0 * scale), sample_step(8, 3000.0 * scale)],
    }


def test_sample_is_valid() -> None:
    validate_run(sample_run())
    assert problems_of(json.loads(json.dumps(sample_run()))) == []


@pytest.mark.parametrize(("damage", "problem"), [
    (lambda d: d.pop("steps"), "run.steps: missing"),
    (lambda d: d["inputs"].pop("model"), "run.inputs.model: missing"),
    (lambda d: d["inputs"].update(concurrency="1,8"), "run.inputs.concurrency: expected a list"),
    (lambda d: d["steps"][0].update(sent="3"), "run.steps[0].sent: expected int"),
    (lambda d: d["steps"][1].update(ok=True), "run.steps[1].ok: expected int, got bool"),
    (lambda d: d["steps"][0]["latency_ms"].pop("p99.9"), "run.steps[0].latency_ms.p99.9"),
    (lambda d: d["steps"][0].update(errors={"UNAVAILABLE": "2"}), "errors"),
    (lambda d: d["environment"]["pinning"].update(server_cpus=0), "server_cpus"),
    (lambda d: d.update(schema="other/9"), "run.schema"),
])
def test_damage_is_named(damage: Any, problem: str) -> None:
    document = copy.deepcopy(sample_run())
    damage(document)
    problems = problems_of(document)
    assert any(problem in p for p in problems), problems
    with pytest.raises(SchemaError):
        validate_run(document)


def test_compare_prints_ratios_and_draws(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(sample_run("base")))
    b.write_text(json.dumps(sample_run("faster", scale=2.0)))
    text = compare([a, b], tmp_path / "both.png")
    assert "2.00x" in text and "1.00x" in text
    assert (tmp_path / "both.png").stat().st_size > 1000


def test_compare_refuses_a_non_run(tmp_path: Path) -> None:
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(sample_run()))
    b.write_text(json.dumps({"schema": SCHEMA}))
    with pytest.raises(SchemaError, match="missing"):
        compare([a, b], None)
