"""An MLflow model's signature (its MLmodel file) as the tensors the model is served with.

Read by the server to complete a model's config (the inputs and outputs, as ONNX models get
theirs from the model file) and by the model process to feed ``predict`` and name what it
returns, so both sides name the tensors the same way:

- a tensor signature (numpy arrays): one tensor per entry, its dtype and shape as logged (the
  first dim -1 is the batch); an unnamed entry is ``input`` / ``output`` (``input_<i>`` when
  there are several);
- a column signature (a pandas DataFrame): one tensor per column, named as the column, of
  shape [-1, 1] (one value per row); ``predict`` gets the DataFrame back.

Imports the standard library, numpy, ``server.types`` and PyYAML (which mlflow needs anyway).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from server.types import DataType

MLMODEL_FILE = "MLmodel"
_COLUMN_TYPES = {
    "boolean": DataType.BOOL, "integer": DataType.INT32, "long": DataType.INT64,
    "float": DataType.FP32, "double": DataType.FP64, "string": DataType.BYTES,
    "binary": DataType.BYTES,
}


class SignatureError(ValueError):
    """The MLmodel file cannot be served: no pyfunc flavour, no signature, a type without a
    tensor form. The message says why, for the model's load failure."""


@dataclass(frozen=True, slots=True)
class Field:
    #: The tensor's name as served.
    name: str
    datatype: DataType
    #: As the signature gives it: -1 for a free dim, the batch first.
    shape: tuple[int, ...]
    #: The entry's own name in the signature; None when it has none.
    source: str | None
    #: BYTES that ``predict`` takes as text (str), not as bytes.
    text: bool = False


@dataclass(frozen=True, slots=True)
class Signature:
    inputs: tuple[Field, ...]
    outputs: tuple[Field, ...]
    #: The inputs are a DataFrame's columns (else numpy tensors).
    columns: bool
    #: The module that loads the model (the pyfunc flavour's ``loader_module``), "" if none.
    loader_module: str = ""


def read_signature(version_dir: Path) -> Signature:
    """The signature of the MLflow model in ``version_dir``. Raises SignatureError (and
    OSError when the file cannot be read)."""
    try:
        import yaml
    except ImportError:
        raise SignatureError("reading an MLmodel file needs PyYAML (installed with mlflow: "
                             "pip install 'peregrine[pyfunc]')") from None
    try:
        mlmodel = yaml.safe_load((version_dir / MLMODEL_FILE).read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SignatureError(f"{MLMODEL_FILE} is not valid YAML: {exc}") from None
    if not isinstance(mlmodel, dict):
        raise SignatureError(f"{MLMODEL_FILE} does not describe a model")
    flavors = mlmodel.get("flavors") or {}
    if "python_function" not in flavors:
        raise SignatureError(f"the MLflow model has no python_function flavour (it has "
                             f"{sorted(flavors)}); only pyfunc models can be served")
    signature = mlmodel.get("signature")
    if not isinstance(signature, dict) or not signature.get("inputs"):
        raise SignatureError("the MLflow model has no signature, which its inputs and outputs "
                             "are served from; log it with one (signature="
                             "mlflow.models.infer_signature(X, model.predict(X)))")
    inputs, columns = _fields(signature.get("inputs"), "input")
    outputs, _ = _fields(signature.get("outputs"), "output")
    if columns and any(f.source is None for f in inputs):
        raise SignatureError("the MLflow model's signature has unnamed input columns; log it "
                             "with a DataFrame of named columns or with numpy arrays")
    loader = flavors["python_function"] or {}
    return Signature(inputs, outputs, columns,
                     str(loader.get("loader_module") or "") if isinstance(loader, dict) else "")


def _fields(text: Any, kind: str) -> tuple[tuple[Field, ...], bool]:
    try:
        entries = json.loads(text) if isinstance(text, str) else text
    except ValueError:
        raise SignatureError(f"the MLflow model's {kind} signature is not JSON") from None
    if not entries:
        raise SignatureError(f"the MLflow model's signature has no {kind}s; log it with "
                             "signature=mlflow.models.infer_signature(X, model.predict(X))")
    if not isinstance(entries, list):
        raise SignatureError(f"the MLflow model's {kind} signature is not a list")
    kinds = {entry.get("type") == "tensor" for entry in entries if isinstance(entry, dict)}
    if len(kinds) != 1 or len(entries) != sum(isinstance(e, dict) for e in entries):
        raise SignatureError(f"the MLflow model's {kind} signature mixes tensors and columns")
    columns = kinds == {False}
    fields = []
    for index, entry in enumerate(entries):
        source = entry.get("name")
        name = str(source) if source is not None else (
            kind if len(entries) == 1 else f"{kind}_{index}")
        if columns:
            datatype = _COLUMN_TYPES.get(str(entry.get("type")))
            if datatype is None:
                raise SignatureError(
                    f"{kind} column '{name}' is of type {entry.get('type')!r}, which has no "
                    f"tensor form; the types served are {sorted(_COLUMN_TYPES)}")
            shape: tuple[int, ...] = (-1, 1)
            text = entry.get("type") == "string"
        else:
            spec = entry.get("tensor-spec") or {}
            datatype = _tensor_type(str(spec.get("dtype")), kind, name)
            shape = tuple(int(d) for d in spec.get("shape") or ())
            text = datatype is DataType.BYTES and str(spec.get("dtype")) != "bytes"
        fields.append(Field(name, datatype, shape, None if source is None else str(source),
                            text))
    return tuple(fields), columns


def _tensor_type(dtype: str, kind: str, name: str) -> DataType:
    try:
        numpy_dtype = np.dtype(dtype)
    except TypeError:
        raise SignatureError(f"{kind} tensor '{name}' has dtype {dtype!r}, which numpy does "
                             "not know") from None
    if numpy_dtype.kind in "OSU":
        return DataType.BYTES
    for datatype in DataType:
        if datatype not in (DataType.BYTES, DataType.BF16) \
                and datatype.numpy_dtype == numpy_dtype:
            return datatype
    raise SignatureError(f"{kind} tensor '{name}' has dtype {dtype}, which has no datatype of "
                         "the protocol")
