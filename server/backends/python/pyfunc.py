"""The model an ``mlflow_pyfunc`` version runs in its model process: ``mlflow.pyfunc``'s model
behind the same ``initialize`` / ``execute`` a ``model.py`` has.

A batch of requests is one ``predict`` call (their rows concatenated, the predictions cut back
per request); when that call fails for a batch of several, each request is predicted alone,
so that only the requests ``predict`` refuses fail. Inputs and outputs are named from the
signature (``signature.py``). Runs in the model process: imports mlflow there, never in the
server.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np

from server.backends.python import triton_python_backend_utils as pb_utils
from server.backends.python.signature import Field, read_signature
from server.types import Array, DataType


class PyfuncModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        version_dir = Path(args["model_repository"]) / args["model_version"]
        self._batches = int(config.get("max_batch_size", 0)) > 0
        self._signature = read_signature(version_dir)
        package = self._signature.loader_module.partition(".")[0]
        if package and importlib.util.find_spec(package) is None:  # said before mlflow loads
            raise pb_utils.TritonModelException(
                f"the MLflow model needs a package that is not installed here: its loader "
                f"module {self._signature.loader_module} (no module named '{package}'); "
                "install what its requirements.txt lists")
        try:
            import mlflow.pyfunc
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"the mlflow_pyfunc backend needs mlflow in the server's Python environment "
                f"(pip install 'peregrine[pyfunc]'): {exc}") from None
        try:
            self._model = mlflow.pyfunc.load_model(str(version_dir))
        except ImportError as exc:
            raise pb_utils.TritonModelException(
                f"the MLflow model needs a package that is not installed here: {exc}; install "
                "what its requirements.txt lists") from None
        except Exception as exc:
            raise pb_utils.TritonModelException(
                f"mlflow could not load the model: {type(exc).__name__}: {exc}") from None

    def execute(self, requests: list[pb_utils.InferenceRequest]) -> list[
            pb_utils.InferenceResponse]:
        if len(requests) > 1 and self._batches:
            try:
                return self._predict(requests)
            except Exception:
                pass  # predicted alone below: only the requests predict refuses fail
        responses = []
        for request in requests:
            try:
                responses.extend(self._predict([request]))
            except Exception as exc:
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(
                    f"predict failed: {type(exc).__name__}: {exc}")))
        return responses

    def _predict(self, requests: list[pb_utils.InferenceRequest]) -> list[
            pb_utils.InferenceResponse]:
        rows: list[int] = []
        columns: dict[Field, list[Array]] = {f: [] for f in self._signature.inputs}
        for request in requests:
            count = 1
            for field, arrays in columns.items():
                tensor = pb_utils.get_input_tensor_by_name(request, field.name)
                if tensor is None:
                    raise pb_utils.TritonModelException(f"input '{field.name}' is missing")
                arrays.append(tensor.as_numpy())
                count = len(arrays[-1]) if self._batches else 1
            rows.append(count)
        joined = {f: np.concatenate(a) if len(a) > 1 else a[0] for f, a in columns.items()}
        outputs = self._outputs(self._model.predict(self._model_input(joined)))
        responses = []
        start = 0
        for request, count in zip(requests, rows, strict=True):
            wanted = set(request.requested_output_names())
            tensors = [pb_utils.Tensor(name, value[start:start + count] if self._batches
                                       else value)
                       for name, value in outputs.items() if not wanted or name in wanted]
            responses.append(pb_utils.InferenceResponse(tensors))
            start += count
        return responses

    def _model_input(self, joined: dict[Field, Array]) -> Any:
        """What ``predict`` takes: a DataFrame of the columns, one array, or named arrays."""
        values = {f: _as_predict_value(f, a) for f, a in joined.items()}
        if self._signature.columns:
            import pandas as pd

            return pd.DataFrame({f.source: v.reshape(-1) for f, v in values.items()})
        if len(values) == 1 and next(iter(values)).source is None:
            return next(iter(values.values()))
        return {f.source: v for f, v in values.items()}

    def _outputs(self, prediction: Any) -> dict[str, Array]:
        """The prediction as the signature's outputs, by served name."""
        fields = self._signature.outputs
        if isinstance(prediction, dict):
            found = {f.name: prediction.get(f.source or f.name) for f in fields}
        elif hasattr(prediction, "columns") and all(f.source in prediction.columns
                                                     for f in fields):
            found = {f.name: prediction[f.source].to_numpy() for f in fields}
        elif len(fields) == 1:
            value = prediction.to_numpy() if hasattr(prediction, "to_numpy") else prediction
            found = {fields[0].name: value}
        else:
            raise pb_utils.TritonModelException(
                f"predict returned a {type(prediction).__name__}; the signature names the "
                f"outputs {[f.name for f in fields]}")
        outputs = {}
        for field in fields:
            value = found[field.name]
            if value is None:
                raise pb_utils.TritonModelException(f"predict returned no '{field.name}'")
            outputs[field.name] = _as_output(field, np.asarray(value))
        return outputs


def _as_predict_value(field: Field, array: Array) -> Array:
    if field.datatype is DataType.BYTES and field.text:
        decoded = np.empty(array.shape, dtype=object)
        decoded.reshape(-1)[:] = [item.decode() if isinstance(item, bytes) else item
                                  for item in array.reshape(-1).tolist()]
        return decoded
    return array


def _as_output(field: Field, value: Array) -> Array:
    if field.datatype is DataType.BYTES:
        value = value.astype(object)
    else:
        value = value.astype(field.datatype.numpy_dtype, copy=False)
    if field.shape == (-1, 1):  # a column: one value per row
        value = value.reshape(-1, 1)
    return value
