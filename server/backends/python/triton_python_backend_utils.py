"""Peregrine's own ``triton_python_backend_utils``: the module a Triton Python model imports
(``import triton_python_backend_utils as pb_utils``), written from Triton's public
documentation of the Python backend, so that a model.py written for Triton runs unchanged for
the features Peregrine supports.

The model process (``stub.py``) registers this module under Triton's name before it imports
the model. What Peregrine does not do fails with a TritonModelException saying so, at the
call: business logic scripting (``InferenceRequest(...).exec()``), decoupled responses
(``get_response_sender``), the model loading API, custom metrics and request rescheduling.
Imports only the standard library and numpy.
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: Triton's TRITONSERVER_DataType numbers, by config name.
_TYPE_CODES = {
    "TYPE_BOOL": 1, "TYPE_UINT8": 2, "TYPE_UINT16": 3, "TYPE_UINT32": 4, "TYPE_UINT64": 5,
    "TYPE_INT8": 6, "TYPE_INT16": 7, "TYPE_INT32": 8, "TYPE_INT64": 9, "TYPE_FP16": 10,
    "TYPE_FP32": 11, "TYPE_FP64": 12, "TYPE_STRING": 13, "TYPE_BF16": 14,
}
_NUMPY_TYPES: dict[str, type[Any]] = {
    "TYPE_BOOL": np.bool_, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16,
    "TYPE_UINT32": np.uint32, "TYPE_UINT64": np.uint64, "TYPE_INT8": np.int8,
    "TYPE_INT16": np.int16, "TYPE_INT32": np.int32, "TYPE_INT64": np.int64,
    "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64,
    "TYPE_STRING": np.object_,
}
#: Triton's wire datatype names, by TRITONSERVER_DataType number.
_WIRE_NAMES = {1: "BOOL", 2: "UINT8", 3: "UINT16", 4: "UINT32", 5: "UINT64", 6: "INT8",
               7: "INT16", 8: "INT32", 9: "INT64", 10: "FP16", 11: "FP32", 12: "FP64",
               13: "BYTES", 14: "BF16"}

TRITONSERVER_RESPONSE_COMPLETE_FINAL = 1
TRITONSERVER_REQUEST_RELEASE_ALL = 1
TRITONSERVER_REQUEST_RELEASE_RESCHEDULE = 2
TRITONSERVER_MEMORY_CPU = 0
TRITONSERVER_MEMORY_CPU_PINNED = 1
TRITONSERVER_MEMORY_GPU = 2


class TritonModelException(Exception):
    """Raised by a model (or by this module) when something fails in initialize, execute or
    finalize."""

    def message(self) -> str:
        return str(self)


def _unsupported(what: str) -> TritonModelException:
    return TritonModelException(f"{what} is not supported by Peregrine's Python backend")


class TritonError:
    """The error of one response: its message and a code (INTERNAL unless given)."""

    UNKNOWN = 0
    INTERNAL = 1
    NOT_FOUND = 2
    INVALID_ARG = 3
    UNAVAILABLE = 4
    UNSUPPORTED = 5
    ALREADY_EXISTS = 6
    CANCELLED = 7

    def __init__(self, message: str, code: int = INTERNAL) -> None:
        self._message = message
        self._code = code

    def message(self) -> str:
        return self._message

    def code(self) -> int:
        return self._code

    def __str__(self) -> str:
        return self._message

    def __repr__(self) -> str:
        return f"TritonError({self._message!r}, {self._code})"


#: The code names the server maps to gRPC status codes.
ERROR_CODE_NAMES = {TritonError.UNKNOWN: "UNKNOWN", TritonError.INTERNAL: "INTERNAL",
                    TritonError.NOT_FOUND: "NOT_FOUND", TritonError.INVALID_ARG: "INVALID_ARG",
                    TritonError.UNAVAILABLE: "UNAVAILABLE",
                    TritonError.UNSUPPORTED: "UNSUPPORTED",
                    TritonError.ALREADY_EXISTS: "ALREADY_EXISTS",
                    TritonError.CANCELLED: "CANCELLED"}


class Tensor:
    """A named tensor: an input of a request, or an output a model returns."""

    def __init__(self, name: str, numpy_array: Any, triton_dtype: int | None = None) -> None:
        array = np.asarray(numpy_array)
        if array.dtype.kind in "US":  # text or fixed-width bytes: the variable-length form
            array = array.astype(object)
        if triton_dtype is not None:
            numpy_dtype = triton_to_numpy_type(triton_dtype)
            if numpy_dtype is None:
                raise TritonModelException(f"unknown triton_dtype {triton_dtype}")
            if array.dtype != numpy_dtype and triton_dtype != _TYPE_CODES["TYPE_BF16"]:
                array = array.view(numpy_dtype)
        else:
            triton_dtype = numpy_to_triton_type(array.dtype)
            if triton_dtype is None:
                raise TritonModelException(
                    f"tensor '{name}': numpy dtype {array.dtype} has no Triton datatype")
        self._name = name
        self._array = array
        self._dtype = triton_dtype

    @classmethod
    def from_dlpack(cls, name: str, dlpack: Any) -> Tensor:
        """From an object that exports DLPack (``__dlpack__``) on the CPU."""
        if not hasattr(dlpack, "__dlpack__"):
            raise _unsupported("Tensor.from_dlpack of a bare capsule (pass the tensor itself)")
        return cls(name, np.from_dlpack(dlpack))

    def to_dlpack(self) -> Any:
        return self._array.__dlpack__()

    def name(self) -> str:
        return self._name

    def as_numpy(self) -> npt.NDArray[Any]:
        return self._array

    def triton_dtype(self) -> int:
        return self._dtype

    def shape(self) -> list[int]:
        return list(self._array.shape)

    def is_cpu(self) -> bool:
        return True

    @property
    def wire_datatype(self) -> str:
        """The datatype's wire name (BYTES, FP32...): how the output travels."""
        return _WIRE_NAMES[self._dtype]


class InferenceRequest:
    """One client request as ``execute`` receives it.

    Constructing one in a model (business logic scripting) is possible, running it is not:
    ``exec`` and ``async_exec`` raise.
    """

    def __init__(self, model_name: str = "", requested_output_names: Sequence[str] = (),
                 inputs: Sequence[Tensor] = (), request_id: str = "",
                 correlation_id: int | str = 0, flags: int = 0, timeout: int = 0,
                 parameters: Mapping[str, Any] | str | None = None, **_: Any) -> None:
        self._model_name = model_name
        self._outputs = list(requested_output_names)
        self._inputs = list(inputs)
        self._id = request_id
        self._correlation_id = correlation_id
        self._flags = flags
        self._timeout = timeout
        self._parameters = parameters if isinstance(parameters, str) \
            else json.dumps(dict(parameters or {}))

    def inputs(self) -> list[Tensor]:
        return self._inputs

    def request_id(self) -> str:
        return self._id

    def correlation_id(self) -> int | str:
        return self._correlation_id

    def requested_output_names(self) -> list[str]:
        return self._outputs

    def flags(self) -> int:
        return self._flags

    def timeout(self) -> int:
        return self._timeout

    def parameters(self) -> str:
        """The request's parameters as a JSON object (a string, as Triton gives it)."""
        return self._parameters

    def is_cancelled(self) -> bool:
        return False

    def get_response_sender(self) -> Any:
        raise _unsupported("decoupled mode (InferenceRequest.get_response_sender)")

    def set_release_flags(self, flags: int) -> None:
        raise _unsupported("request rescheduling (InferenceRequest.set_release_flags)")

    def exec(self, *_: Any, **__: Any) -> Any:
        raise _unsupported(f"business logic scripting (InferenceRequest.exec of model "
                           f"'{self._model_name}')")

    async def async_exec(self, *_: Any, **__: Any) -> Any:
        raise _unsupported(f"business logic scripting (InferenceRequest.async_exec of model "
                           f"'{self._model_name}')")


class InferenceResponse:
    """The answer to one request: output tensors, or an error."""

    def __init__(self, output_tensors: Sequence[Tensor] | None = None,
                 error: TritonError | None = None,
                 parameters: Mapping[str, Any] | str | None = None) -> None:
        if output_tensors is not None and not isinstance(output_tensors, (list, tuple)):
            raise TritonModelException('"output_tensors" must be a list')
        self._outputs = list(output_tensors or [])
        self._error = error
        self._parameters = parameters

    def output_tensors(self) -> list[Tensor]:
        return self._outputs

    def has_error(self) -> bool:
        return self._error is not None

    def error(self) -> TritonError | None:
        return self._error


def get_input_tensor_by_name(inference_request: InferenceRequest, name: str) -> Tensor | None:
    return _by_name(inference_request.inputs(), name)


def get_output_tensor_by_name(inference_response: InferenceResponse,
                              name: str) -> Tensor | None:
    return _by_name(inference_response.output_tensors(), name)


def _by_name(tensors: Iterable[Tensor], name: str) -> Tensor | None:
    return next((t for t in tensors if t.name() == name), None)


def get_input_config_by_name(model_config: Mapping[str, Any],
                             name: str) -> dict[str, Any] | None:
    return next((t for t in model_config.get("input", []) if t.get("name") == name), None)


def get_output_config_by_name(model_config: Mapping[str, Any],
                              name: str) -> dict[str, Any] | None:
    return next((t for t in model_config.get("output", []) if t.get("name") == name), None)


def triton_string_to_numpy(triton_type_string: str) -> type[Any]:
    """``TYPE_FP32`` -> numpy.float32 (``TYPE_STRING`` -> numpy.object_)."""
    try:
        return _NUMPY_TYPES[triton_type_string]
    except KeyError:
        raise TritonModelException(f"unknown data_type '{triton_type_string}'") from None


def triton_to_numpy_type(data_type: int) -> type[Any] | None:
    for name, code in _TYPE_CODES.items():
        if code == data_type:
            return _NUMPY_TYPES.get(name, np.uint16)  # BF16 travels as 16-bit words
    return None


def numpy_to_triton_type(data_type: Any) -> int | None:
    """A numpy dtype (or scalar type) -> Triton's datatype number; None for others."""
    try:
        dtype = np.dtype(data_type)
    except TypeError:
        return None
    if dtype.kind in "OSU":
        return _TYPE_CODES["TYPE_STRING"]
    for name, numpy_type in _NUMPY_TYPES.items():
        if numpy_type is not np.object_ and dtype == np.dtype(numpy_type):
            return _TYPE_CODES[name]
    return None


def serialize_byte_tensor(input_tensor: npt.NDArray[Any]) -> npt.NDArray[np.uint8] | None:
    """A BYTES tensor as Triton lays it out: each element's 4-byte length, then its bytes."""
    if input_tensor.size == 0:
        return None
    out = bytearray()
    for item in input_tensor.reshape(-1).tolist():
        data = item if isinstance(item, bytes) else str(item).encode()
        out += struct.pack("<I", len(data)) + data
    return np.frombuffer(bytes(out), dtype=np.uint8)


def deserialize_bytes_tensor(encoded_tensor: bytes) -> npt.NDArray[Any]:
    items = []
    offset = 0
    while offset < len(encoded_tensor):
        (length,) = struct.unpack_from("<I", encoded_tensor, offset)
        offset += 4
        items.append(bytes(encoded_tensor[offset:offset + length]))
        offset += length
    return np.array(items, dtype=object)


class ModelConfig:
    """The configuration ``auto_complete_config`` may complete (max_batch_size, inputs,
    outputs, dynamic batching)."""

    def __init__(self, model_config: Mapping[str, Any] | str) -> None:
        self._config = json.loads(model_config) if isinstance(model_config, str) \
            else dict(model_config)

    def as_dict(self) -> dict[str, Any]:
        return self._config

    def set_max_batch_size(self, max_batch_size: int) -> None:
        self._config["max_batch_size"] = int(max_batch_size)

    def set_dynamic_batching(self) -> None:
        self._config.setdefault("dynamic_batching", {})

    def add_input(self, input: Mapping[str, Any]) -> None:
        self._add("input", input)

    def add_output(self, output: Mapping[str, Any]) -> None:
        self._add("output", output)

    def set_model_transaction_policy(self, policy: Mapping[str, Any]) -> None:
        if policy.get("decoupled"):
            raise _unsupported("decoupled mode (model_transaction_policy decoupled)")

    def _add(self, kind: str, tensor: Mapping[str, Any]) -> None:
        for key in ("name", "data_type", "dims"):
            if key not in tensor:
                raise TritonModelException(f"{kind} {dict(tensor)} has no '{key}'")
        tensors = self._config.setdefault(kind, [])
        existing = next((t for t in tensors if t.get("name") == tensor["name"]), None)
        if existing is None:
            tensors.append(dict(tensor))
        elif existing.get("data_type") != tensor["data_type"] or \
                [int(d) for d in existing.get("dims", [])] != [int(d) for d in tensor["dims"]]:
            raise TritonModelException(
                f"{kind} '{tensor['name']}' is already declared as {existing.get('data_type')} "
                f"{existing.get('dims')}")


class Logger:
    """Log lines from a model: they go to the server's log, with the model's name, at their
    level (written to the process's stderr with a level prefix the server reads)."""

    class LogLevel:
        INFO = 0
        WARNING = 1
        ERROR = 2
        VERBOSE = 3

    _PREFIX = {LogLevel.INFO: "INFO", LogLevel.WARNING: "WARNING", LogLevel.ERROR: "ERROR",
               LogLevel.VERBOSE: "VERBOSE"}

    @staticmethod
    def log(message: str, level: int = LogLevel.INFO) -> None:
        prefix = Logger._PREFIX.get(level, "INFO")
        for line in str(message).splitlines() or [""]:
            print(f"{prefix}: {line}", file=sys.stderr, flush=True)

    @staticmethod
    def log_info(message: str) -> None:
        Logger.log(message, Logger.LogLevel.INFO)

    @staticmethod
    def log_warn(message: str) -> None:
        Logger.log(message, Logger.LogLevel.WARNING)

    @staticmethod
    def log_error(message: str) -> None:
        Logger.log(message, Logger.LogLevel.ERROR)

    @staticmethod
    def log_verbose(message: str) -> None:
        Logger.log(message, Logger.LogLevel.VERBOSE)


def load_model(*_: Any, **__: Any) -> None:
    raise _unsupported("the model loading API (load_model)")


def unload_model(*_: Any, **__: Any) -> None:
    raise _unsupported("the model loading API (unload_model)")


def is_model_ready(*_: Any, **__: Any) -> bool:
    raise _unsupported("the model loading API (is_model_ready)")


class MetricFamily:
    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2

    def __init__(self, *_: Any, **__: Any) -> None:
        raise _unsupported("custom metrics (MetricFamily)")
