"""bench/studies/ablation_server.py: every stage is a working server that answers correctly, so the
frontend-overhead ablation measures real request paths, not broken ones."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from bench.compare.servers import PeregrineProcess
from bench.studies.ablation_server import STAGES, main
from bench.studies.inprocess_path import measure as measure_in_process
from tests import model_factory


@pytest.fixture(scope="module")
def repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("ablation-repo")
    model_factory.add_sub_model(repo, "add_sub")
    return repo


@pytest.mark.parametrize("stage", STAGES)
def test_each_stage_answers_like_the_full_server(repository: Path, stage: str) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)
    launcher = ("-m", "bench.studies.ablation_server", "--stage", stage)
    with PeregrineProcess(repository, name=f"test-ablation-{stage}",
                          launcher=launcher) as server:
        client = grpcclient.InferenceServerClient(server.url)
        try:
            for _ in range(3):  # the first answer may come from the full path: check later ones
                inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
                          grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
                inputs[0].set_data_from_numpy(a)
                inputs[1].set_data_from_numpy(b)
                result = client.infer("add_sub", inputs)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)
                np.testing.assert_array_equal(result.as_numpy("OUTPUT1"), a - b)
        finally:
            client.close()


def test_an_unknown_stage_is_a_usage_error() -> None:
    assert main(["--stage", "nothing", "serve"]) == 2


def test_in_process_stages_are_all_measured(repository: Path, tmp_path: Path) -> None:
    inputs = tmp_path / "add_sub.npz"
    np.savez(inputs, INPUT0=np.ones((1, 16), dtype=np.float32),
             INPUT1=np.ones((1, 16), dtype=np.float32))
    cpus = sorted(os.sched_getaffinity(0))[:1]
    result = measure_in_process(repository, {"add_sub": inputs}, cpus, concurrency=4,
                                requests=40)
    assert set(result) == {"add_sub"}
    assert set(result["add_sub"]) == set(STAGES)
    assert all(cpu_us >= 0 for cpu_us in result["add_sub"].values())
    # The process is back on the CPUs it had.
    assert len(os.sched_getaffinity(0)) >= len(cpus)
