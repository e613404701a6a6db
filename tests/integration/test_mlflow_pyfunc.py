"""MLflow pyfunc models from a model repository (issue 16 item 3): a version directory holding
an MLflow model (its MLmodel file) is served through ``mlflow.pyfunc.load_model`` in a model
process, its signature giving the inputs and outputs.

Real scikit-learn models saved with ``mlflow.sklearn.save_model``: one with a numpy (tensor)
signature and no config.pbtxt (the backend and the tensors found from the files, batching as
an auto-completed ONNX model gets it), one with a DataFrame (column) signature behind a
config.pbtxt; and two that must fail to load with the reason: no signature, and a flavour
whose module is not installed. The registry case is in test_mlflow_source.py (it shares the
tracking server there).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from tests.integration.test_lifecycle import index
from tests.server_harness import ServerThread

pytestmark = [
    pytest.mark.skipif(importlib.util.find_spec("mlflow") is None,
                       reason="mlflow is not installed (pip install -e '.[test]' installs it)"),
    # Each model process imports mlflow (seconds of CPU each on a loaded machine).
    pytest.mark.timeout(300),
]

COLUMNS = ["sepal_length", "sepal_width", "petal_length", "petal_width"]
#: What a gradient-boosting model's skops file holds beyond skops' own trusted types.
TRUSTED = ["sklearn.tree._tree.Tree"]


def iris() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_iris

    x, y = load_iris(return_X_y=True)
    return x.astype(np.float64), y.astype(np.int64)


def save(model: Any, path: Path, x: Any, signature: bool = True) -> None:
    """As mlflow 3 saves it (skops, the trees' type trusted); the requirements given, not
    inferred (which would import every package around)."""
    import mlflow.sklearn
    from mlflow.models import infer_signature

    mlflow.sklearn.save_model(
        model, str(path), signature=infer_signature(x, model.predict(x)) if signature else None,
        skops_trusted_types=TRUSTED, pip_requirements=["scikit-learn"])


@pytest.fixture(scope="module")
def fitted() -> dict[str, Any]:
    import pandas as pd
    from sklearn.ensemble import GradientBoostingClassifier

    x, y = iris()
    on_arrays = GradientBoostingClassifier(n_estimators=10, random_state=0).fit(x, y)
    frame = pd.DataFrame(x, columns=COLUMNS)
    on_frame = GradientBoostingClassifier(n_estimators=10, random_state=1).fit(frame, y)
    return {"x": x, "arrays": on_arrays, "frame": on_frame}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, fitted: dict[str, Any]) -> Path:
    import pandas as pd

    repo = tmp_path_factory.mktemp("pyfunc")
    x = fitted["x"]
    save(fitted["arrays"], repo / "iris" / "1", x)
    save(fitted["frame"], repo / "iris_columns" / "1", pd.DataFrame(x, columns=COLUMNS))
    (repo / "iris_columns" / "config.pbtxt").write_text(
        'backend: "mlflow_pyfunc"\nmax_batch_size: 16\ndynamic_batching { }\n')
    save(fitted["arrays"], repo / "unsigned" / "1", x, signature=False)
    missing = repo / "missing_flavour" / "1"
    save(fitted["arrays"], missing, x)
    mlmodel = missing / "MLmodel"
    mlmodel.write_text(mlmodel.read_text().replace("mlflow.sklearn",
                                                   "peregrine_missing_flavour"))
    return repo


@pytest.fixture(scope="module")
def client(repo: Path) -> Iterator[grpcclient.InferenceServerClient]:
    with ServerThread(repo, strict_readiness=False, start_timeout_s=180) as running, \
            grpcclient.InferenceServerClient(running.url) as c:
        yield c


def test_a_tensor_signature_serves_the_model_without_a_config(
    client: grpcclient.InferenceServerClient, fitted: dict[str, Any],
) -> None:
    metadata = client.get_model_metadata("iris")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [("input", "FP64", [-1, 4])]
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.outputs] == \
        [("output", "INT64", [-1])]
    config = client.get_model_config("iris").config
    assert config.backend == "mlflow_pyfunc"
    assert config.max_batch_size == 4  # auto-completed, as an ONNX model without a config
    x = fitted["x"][[0, 60, 120, 149]]
    tensor = grpcclient.InferInput("input", list(x.shape), "FP64")
    tensor.set_data_from_numpy(x)
    got = client.infer("iris", [tensor]).as_numpy("output")
    np.testing.assert_array_equal(got, fitted["arrays"].predict(x))


def test_a_column_signature_takes_one_tensor_per_column(
    client: grpcclient.InferenceServerClient, fitted: dict[str, Any],
) -> None:
    import pandas as pd

    metadata = client.get_model_metadata("iris_columns")
    assert [(t.name, t.datatype, list(t.shape)) for t in metadata.inputs] == \
        [(name, "FP64", [-1, 1]) for name in COLUMNS]
    x = fitted["x"][::10]
    inputs = []
    for i, name in enumerate(COLUMNS):
        tensor = grpcclient.InferInput(name, [len(x), 1], "FP64")
        tensor.set_data_from_numpy(np.ascontiguousarray(x[:, i:i + 1]))
        inputs.append(tensor)
    got = client.infer("iris_columns", inputs).as_numpy("output")
    want = fitted["frame"].predict(pd.DataFrame(x, columns=COLUMNS))
    np.testing.assert_array_equal(got.reshape(-1), want)


def test_unservable_versions_fail_to_load_with_the_reason(
    client: grpcclient.InferenceServerClient,
) -> None:
    states = index(client)
    state, reason = states[("unsigned", "")]
    assert state == "UNAVAILABLE"
    assert "the MLflow model has no signature" in reason, reason
    state, reason = states[("missing_flavour", "1")]
    assert state == "UNAVAILABLE"
    assert "needs a package that is not installed" in reason, reason
    assert "peregrine_missing_flavour" in reason, reason
