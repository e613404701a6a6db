"""The ONNX Runtime instance on the CPU: its direct call of the session, the terminate flag
written only after a cancel, and its session freed at close."""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import numpy as np

from server.backends.onnxruntime import OnnxRuntimeInstance
from tests import model_factory
from tests.unit.scheduler.test_batcher import load_spec_and_instances


def identity(tmp_path: Path) -> OnnxRuntimeInstance:
    model_dir = model_factory.identity_model(tmp_path, "identity", "FP32", max_batch_size=8)
    _, [backend] = load_spec_and_instances(model_dir)
    assert isinstance(backend, OnnxRuntimeInstance)
    return backend


def test_a_cancel_between_runs_does_not_stop_the_next_run(tmp_path: Path) -> None:
    """ONNX Runtime's terminate flag is cleared only after a cancel: a cancel that came
    after a run ended leaves the next run whole, and the run after it too."""
    backend = identity(tmp_path)
    x = np.random.default_rng(4).random((3, 5), dtype=np.float32)
    backend.cancel()
    for _ in range(2):
        np.testing.assert_array_equal(backend.execute({"INPUT0": x})["OUTPUT0"], x)
        np.testing.assert_array_equal(
            backend.execute({"INPUT0": x})["OUTPUT0"],
            backend.session.run(["OUTPUT0"], {"INPUT0": x})[0])


def test_closing_an_instance_frees_its_session_at_once(tmp_path: Path) -> None:
    """Nothing the instance keeps (its bound run, say) holds ONNX Runtime's session, and so
    the model's weights, after ``close``, although the instance object itself lives on."""
    backend = identity(tmp_path)
    backend.execute({"INPUT0": np.ones((2, 5), np.float32)})
    native = weakref.ref(backend.session._sess)
    backend.close()
    gc.collect()
    assert native() is None


def test_an_undeclared_map_output_comes_back_as_an_array(tmp_path: Path) -> None:
    """A scikit-learn classifier exported with its ZipMap (probabilities as a list of dicts,
    not a tensor), the config declaring only the label: the instance takes ONNX Runtime's
    general path, so every output is an array the batch's row check can read, and the
    label comes back as the classifier predicts."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    x = np.random.default_rng(6).random((40, 3), dtype=np.float32)
    classifier = LogisticRegression().fit(x, (x[:, 0] > 0.5).astype(np.int64))
    model_dir = tmp_path / "zipmap"
    (model_dir / "1").mkdir(parents=True)
    (model_dir / "1" / "model.onnx").write_bytes(
        to_onnx(classifier, x[:1], target_opset=17).SerializeToString())
    (model_dir / "config.pbtxt").write_text(
        'name: "zipmap"\nbackend: "onnxruntime"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, 3 ] } ]\n'
        'output [ { name: "output_label" data_type: TYPE_INT64 dims: [ -1 ] } ]\n')
    _, [backend] = load_spec_and_instances(model_dir)
    assert isinstance(backend, OnnxRuntimeInstance)
    assert any(not o.type.startswith("tensor(") for o in backend.session.get_outputs())
    outputs = backend.execute({"X": x})
    np.testing.assert_array_equal(outputs["output_label"], classifier.predict(x))
    assert all(isinstance(value, np.ndarray) and len(value) == len(x)
               for value in outputs.values())
