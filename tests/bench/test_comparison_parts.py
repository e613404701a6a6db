"""Pieces the comparisons rely on: config rewriting and sharing a step among processes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from google.protobuf import text_format

from bench.compare.model_repo import (
    ORT_PARAMETERS,
    batching_of,
    comparison_repository,
    remove_block,
    set_parameters,
)
from bench.loadgen.loops import StepPlan
from bench.loadgen.workers import split_plans
from bench.studies.gpu_backends import config_for
from server._pb import model_config_pb2 as mc
from server.app import backend_factories, check_model_parameters
from server.repository.model_config import to_spec

CONFIG = """name: "m"
platform: "onnxruntime_onnx"
max_batch_size: 64
version_policy: { all { } }
input [ { name: "input" data_type: TYPE_FP32 dims: [ 64 ] } ]
dynamic_batching {
  preferred_batch_size: [ 16, 32 ]
  max_queue_delay_microseconds: 500
  default_queue_policy {
    max_queue_size: 8
  }
}
instance_group [ { count: 1 kind: KIND_CPU } ]
parameters { key: "intra_op_thread_count" value: { string_value: "4" } }
"""


def test_remove_block_takes_nested_braces() -> None:
    text = remove_block(CONFIG, "dynamic_batching")
    assert "dynamic_batching" not in text and "max_queue_size" not in text
    assert "instance_group" in text and text.count("{") == text.count("}")
    assert remove_block(text, "dynamic_batching") == text


def test_set_parameters_replaces_and_adds() -> None:
    text = set_parameters(CONFIG, {"intra_op_thread_count": "1", "allow_spinning": "0"})
    assert '"4"' not in text
    assert text.count("intra_op_thread_count") == 1 and text.count("allow_spinning") == 1


def test_batching_of() -> None:
    limits = batching_of(CONFIG)
    assert (limits.max_batch_size, limits.max_queue_delay_us, limits.dynamic_batching) == (
        64, 500, True)
    assert not batching_of(remove_block(CONFIG, "dynamic_batching")).dynamic_batching


def test_comparison_repository(tmp_path: Path) -> None:
    source = tmp_path / "src"
    for version in ("1", "2"):
        (source / "m" / version).mkdir(parents=True)
        (source / "m" / version / "model.onnx").write_bytes(version.encode())
    (source / "m" / "config.pbtxt").write_text(CONFIG)
    dest = comparison_repository(source, tmp_path / "off", ["m"], batching=False)
    assert sorted(p.name for p in (dest / "m").iterdir()) == ["2", "config.pbtxt"]
    text = (dest / "m" / "config.pbtxt").read_text()
    assert "version_policy" not in text and "dynamic_batching" not in text
    assert 'allow_spinning" value: { string_value: "0"' in text


@pytest.mark.parametrize(("runtime", "extra"), [
    ("ort", ORT_PARAMETERS),
    ("ort", {"drift_sample_rate": "0.1"}),  # bench/drift_overhead.py
    ("ort_trt", {}),
    ("trt", {}),
])
def test_the_benchmarks_set_only_parameters_the_server_knows(
    tmp_path: Path, runtime: str, extra: dict[str, str],
) -> None:
    example = CONFIG.replace(CONFIG[CONFIG.index("parameters"):], "")  # as examples/ writes
    text = set_parameters(config_for(example, runtime, "fp16"), extra)
    config = text_format.Parse(text, mc.ModelConfig())
    spec = to_spec(config, tmp_path / "m")
    check_model_parameters(spec, backend_factories()[spec.backend])


def test_split_plans_shares_everything_out() -> None:
    plan = StepPlan(rpc="unary", mode="closed", concurrency=5, rate=0.0, arrival="poisson",
                    phase_s=0.0, start_at_ns=0, warmup_s=1.0, duration_s=None, requests=7,
                    timeout_s=1.0, drain_s=1.0, seed=3)
    plans = split_plans(plan, 2)
    assert [p.concurrency for p in plans] == [3, 2]
    assert [p.requests for p in plans] == [4, 3]
    assert [p.seed for p in plans] == [3, 4]
    open_plans = split_plans(replace(plan, mode="open", rate=1000.0, concurrency=1024,
                                     requests=None, duration_s=1.0), 4)
    assert [p.rate for p in open_plans] == [250.0] * 4
    assert [p.phase_s for p in open_plans] == [0.0, 0.001, 0.002, 0.003]
    assert all(p.concurrency == 256 for p in open_plans)
