"""BatchExecutor.run_rows (peregrine batch's direct path) on real ONNX Runtime instances: the
joined outputs against numpy, and each way a backend's outputs can disagree with the rows
it was given, caught before the batches are handed on, and named in the error."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest

from server.errors import BackendError
from server.interfaces import Backend
from server.packing import default_packer
from server.scheduler.executor import BatchExecutor
from server.spec import ModelSpec
from server.types import Array
from tests import model_factory
from tests.unit.scheduler.test_batcher import load_spec_and_instances

Altered = Callable[[int, dict[str, Array]], dict[str, Array]]


class AlteredOutputs:
    """A real instance whose ``call``-th batch's outputs pass through ``alter``."""

    def __init__(self, backend: Backend, alter: Altered) -> None:
        self._backend = backend
        self._alter = alter
        self.calls = 0

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        outputs = self._backend.execute(inputs)
        self.calls += 1
        return self._alter(self.calls, outputs)

    def close(self) -> None:
        self._backend.close()


def executor(tmp_path: Path, max_batch_size: int) -> tuple[ModelSpec, BatchExecutor, Backend]:
    model_dir = model_factory.identity_model(tmp_path, "identity", "FP32",
                                             max_batch_size=max_batch_size)
    spec, instances = load_spec_and_instances(model_dir)
    return spec, BatchExecutor(spec, "1", default_packer.for_model(spec, "1")), instances[0]


@pytest.mark.parametrize("rows", [1, 8, 50])
def test_rows_come_back_joined_in_order(tmp_path: Path, rows: int) -> None:
    _, run, backend = executor(tmp_path, 8)
    x = np.random.default_rng(rows).random((rows, 5), dtype=np.float32)
    counting = AlteredOutputs(backend, lambda call, outputs: outputs)
    outputs = run.run_rows(counting, {"INPUT0": x}, 8)
    assert list(outputs) == ["OUTPUT0"]
    np.testing.assert_array_equal(outputs["OUTPUT0"], x)
    assert counting.calls == -(-rows // 8)


def test_a_model_without_batching_runs_one_row_at_a_time(tmp_path: Path) -> None:
    _, run, backend = executor(tmp_path, 0)
    x = np.random.default_rng(3).random((6, 4), dtype=np.float32)
    counting = AlteredOutputs(backend, lambda call, outputs: outputs)
    np.testing.assert_array_equal(run.run_rows(counting, {"INPUT0": x}, 8)["OUTPUT0"], x)
    assert counting.calls == 6


def _drop_a_row_of_batch(batch: int) -> Altered:
    return lambda call, outputs: ({"OUTPUT0": outputs["OUTPUT0"][1:]} if call == batch
                                  else outputs)


@pytest.mark.parametrize(("alter", "message"), [
    (_drop_a_row_of_batch(2), r"output 'OUTPUT0' has shape \[7, 5\]; expected 8 rows"),
    (_drop_a_row_of_batch(3), r"output 'OUTPUT0' has shape \[1, 5\]; expected 2 rows"),
    (lambda call, outputs: {"OUTPUT0": outputs["OUTPUT0"][:, :3]} if call == 2 else outputs,
     r"output 'OUTPUT0' has shape \[8, 3\] in one batch and \[8, 5\] in another"),
    (lambda call, outputs: {"OUTPUT0": np.float32(1.0) * np.ones(())} if call == 1
     else outputs, r"output 'OUTPUT0' has shape \[\]; expected 8 rows"),
    (lambda call, outputs: {} if call == 3 else outputs,
     r"model 'identity' returned no output 'OUTPUT0'"),
])
def test_outputs_that_disagree_with_their_batch_are_refused_by_name(
        tmp_path: Path, alter: Altered, message: str) -> None:
    _, run, backend = executor(tmp_path, 8)
    x = np.random.default_rng(1).random((18, 5), dtype=np.float32)  # batches of 8, 8, 2
    with pytest.raises(BackendError, match=message):
        run.run_rows(AlteredOutputs(backend, alter), {"INPUT0": x}, 8)


def test_rows_of_a_model_without_batching_must_agree_in_shape(tmp_path: Path) -> None:
    _, run, backend = executor(tmp_path, 0)
    x = np.random.default_rng(2).random((4, 5), dtype=np.float32)
    shorter = AlteredOutputs(backend, lambda call, outputs: (
        {"OUTPUT0": outputs["OUTPUT0"][:2]} if call == 4 else outputs))
    with pytest.raises(BackendError, match=r"output 'OUTPUT0' has shape \[2\] for one row "
                                           r"and \[5\] for another"):
        run.run_rows(shorter, {"INPUT0": x}, 8)
