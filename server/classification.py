"""Triton's classification extension: an output answered as its top classes.

A requested output with the ``classification`` parameter (an int64 ``k``, what tritonclient's
``InferRequestedOutput(name, class_count=k)`` sends) is answered, instead of its values, as a
BYTES tensor of its ``k`` largest elements, largest first, each ``"<value>:<index>"`` or
``"<value>:<index>:<label>"`` when the output's ``label_filename`` has a line for that index.
What Triton does, and so what this does:

* for a model that batches, each row of the output is classified on its own and the answer
  has shape ``[rows, min(k, n)]``, ``n`` being the elements of one row; otherwise the whole
  output is one row and the answer has shape ``[min(k, n)]``;
* the value is printed as C++'s ``std::to_string`` prints it: floating point with six
  decimals (``"0.750000"``), integers as they are;
* labels are the lines of the label file (index 0 is the first line); an index past the last
  line, or an empty line, gives no label;
* only integer, FP32 and FP64 outputs can be classified.

Equal values are taken lowest index first (Triton's sort leaves their order unspecified).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from server.types import Array, DataType, OutputTensor

#: The requested output's parameter that asks for classes, and how many.
PARAMETER = "classification"
#: The datatypes Triton classifies.
CLASSIFIABLE = frozenset({
    DataType.UINT8, DataType.UINT16, DataType.UINT32, DataType.UINT64,
    DataType.INT8, DataType.INT16, DataType.INT32, DataType.INT64,
    DataType.FP32, DataType.FP64,
})


def unsupported_type(datatype: DataType) -> str:
    """Triton's wording for an output of a datatype it cannot classify."""
    return f"class result not available for output due to unsupported type '{datatype.wire}'"


def _text(value: int | float, floating: bool) -> bytes:
    return (f"{value:f}" if floating else str(value)).encode()


def top_classes(rows: Array, count: int, labels: Sequence[bytes]) -> Array:
    """``rows`` [R, n] -> an object array [R, min(count, n)] of class strings (bytes)."""
    n = rows.shape[1]
    k = min(count, n)
    # Stable ascending sort of each row reversed, then reversed: largest first, and equal
    # values lowest index first. (Negating would overflow unsigned types.)
    order = n - 1 - np.argsort(rows[:, ::-1], axis=1, kind="stable")[:, ::-1][:, :k]
    floating = rows.dtype.kind == "f"
    out = np.empty((rows.shape[0], k), dtype=object)
    for r in range(rows.shape[0]):
        values = rows[r, order[r]].tolist()
        for j, index in enumerate(order[r].tolist()):
            text = _text(values[j], floating) + b":" + str(index).encode()
            label = labels[index] if index < len(labels) else b""
            out[r, j] = text + b":" + label if label else text
    return out


def classify(tensor: OutputTensor, count: int, labels: Sequence[bytes],
             batched: bool) -> OutputTensor:
    """``tensor``'s top ``count`` classes (see the module's docstring); ``batched`` when the
    model batches (the first dim is the request's rows)."""
    data = tensor.data
    if batched and data.ndim > 0:
        rows = data.reshape(data.shape[0], math.prod(data.shape[1:]))
    else:
        rows = data.reshape(1, data.size)
    classes = top_classes(rows, count, labels)
    if not (batched and data.ndim > 0):
        classes = classes.reshape(classes.shape[1])
    return OutputTensor(tensor.name, DataType.BYTES, classes)
