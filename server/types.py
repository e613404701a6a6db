"""Internal request, response and tensor types: numpy arrays, never protobuf objects."""

from __future__ import annotations

import enum
from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, TypeAlias

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from server._pb import grpc_service_pb2 as pb

ParamValue = bool | int | float | str

# The parsed form of a ModelInferRequest (server/codec/parsed.py fills it).
#: ``(oneof field number, value)``: the number keeps int64_param and uint64_param apart.
Parameter = tuple[int, ParamValue | None]
Parameters = Mapping[str, Parameter]
#: An input's typed contents: the message (protobuf path) or its serialized bytes (native
#: path: a view of the request, parsed by the protobuf runtime only on this rare path).
TypedContents: TypeAlias = "pb.InferTensorContents | memoryview | bytes"
#: ``(name, datatype, shape, parameters, contents or None)``
ParsedInput = tuple[str, str, tuple[int, ...], Parameters, "TypedContents | None"]
#: ``(name, parameters)``
ParsedOutput = tuple[str, Parameters]
#: ``(model_name, model_version, id, parameters, inputs, outputs, raw_input_contents)``
ParsedRequest = tuple[
    str, str, str, Parameters, Sequence[ParsedInput], Sequence[ParsedOutput],
    Sequence[bytes | memoryview],
]


class DataType(enum.Enum):
    """Open Inference Protocol datatypes, with their config (TYPE_*) and numpy forms."""

    BOOL = ("BOOL", "TYPE_BOOL", np.dtype(np.bool_))
    UINT8 = ("UINT8", "TYPE_UINT8", np.dtype("<u1"))
    UINT16 = ("UINT16", "TYPE_UINT16", np.dtype("<u2"))
    UINT32 = ("UINT32", "TYPE_UINT32", np.dtype("<u4"))
    UINT64 = ("UINT64", "TYPE_UINT64", np.dtype("<u8"))
    INT8 = ("INT8", "TYPE_INT8", np.dtype("<i1"))
    INT16 = ("INT16", "TYPE_INT16", np.dtype("<i2"))
    INT32 = ("INT32", "TYPE_INT32", np.dtype("<i4"))
    INT64 = ("INT64", "TYPE_INT64", np.dtype("<i8"))
    FP16 = ("FP16", "TYPE_FP16", np.dtype("<f2"))
    FP32 = ("FP32", "TYPE_FP32", np.dtype("<f4"))
    FP64 = ("FP64", "TYPE_FP64", np.dtype("<f8"))
    BYTES = ("BYTES", "TYPE_STRING", np.dtype(object))
    #: numpy has no bfloat16: the raw 2-byte words are carried as uint16.
    BF16 = ("BF16", "TYPE_BF16", np.dtype("<u2"))

    def __init__(self, wire: str, config_name: str, numpy_dtype: np.dtype[Any]) -> None:
        self.wire = wire
        self.config_name = config_name
        self.numpy_dtype = numpy_dtype

    @property
    def itemsize(self) -> int:
        """Bytes per element on the wire; 0 for the variable-length BYTES."""
        return 0 if self is DataType.BYTES else self.numpy_dtype.itemsize

    @classmethod
    def from_wire(cls, name: str) -> DataType:
        try:
            return _BY_WIRE[name]
        except KeyError:
            raise ValueError(f"unknown datatype '{name}'") from None

    @classmethod
    def from_config(cls, name: str) -> DataType:
        try:
            return _BY_CONFIG[name]
        except KeyError:
            raise ValueError(f"unsupported data_type '{name}'") from None


_BY_WIRE = {dt.wire: dt for dt in DataType}
_BY_CONFIG = {dt.config_name: dt for dt in DataType}

Array = npt.NDArray[Any]


@dataclass(slots=True)
class InferRequest:
    """One decoded inference request. Inputs are numpy views over the wire bytes where possible."""

    model_name: str
    model_version: str
    id: str
    inputs: dict[str, Array]
    input_types: dict[str, DataType]
    requested_outputs: tuple[str, ...] | None = None
    parameters: dict[str, ParamValue] = field(default_factory=dict)
    priority: int = 0
    timeout_us: int = 0
    #: Absolute deadline on the perf_counter_ns clock, from the client's gRPC deadline.
    deadline_ns: int | None = None
    #: The bytes the inputs decoded into (codec.caps), counted against --max-queued-bytes.
    nbytes: int = 0
    #: Requested outputs to answer as their top classes (Triton's classification
    #: extension): output name -> how many classes; None when none is asked.
    classification: dict[str, int] | None = None
    #: With tracing on, set on every decoded request (server/tracing: a sampled request's
    #: record, else None) and read only by tracing; without, never set (not even a default,
    #: so a server that does not trace writes nothing for it per request).
    trace: Any = field(init=False, repr=False, compare=False)
    #: A response-cache miss found on the parsed request before decoding (DataPlane.cached):
    #: its key and the lookup's nanoseconds. Set only then, so neither is done twice.
    cache_miss: tuple[Hashable, int] = field(init=False, repr=False, compare=False)


class OutputTensor:
    """One output of a response: an array, or the exact bytes it encodes to.

    The native unpacker slices batch outputs straight into per-request ``bytes`` (the
    future ``raw_output_contents`` entry) and sets ``raw`` and ``shape``; the encoder then
    sends ``raw`` as is. ``data`` is always available: for a raw tensor it is a read-only
    numpy view over ``raw``, made on first use (drift sampling, shadow comparison, shared-
    memory outputs), so the hot path creates no array per request.
    """

    __slots__ = ("_data", "datatype", "name", "raw", "shape")

    def __init__(
        self,
        name: str,
        datatype: DataType,
        data: Array | None = None,
        *,
        raw: bytes | None = None,
        shape: tuple[int, ...] | None = None,
    ) -> None:
        self.name = name
        self.datatype = datatype
        if data is not None:
            if raw is not None:
                raise ValueError("an OutputTensor holds an array or raw bytes, not both")
            self.shape: tuple[int, ...] = tuple(data.shape)
        elif raw is None or shape is None:
            raise ValueError("an OutputTensor needs an array, or raw bytes and a shape")
        else:
            self.shape = shape
        self._data = data
        #: The tensor's raw_output_contents when the packer produced them, else None.
        self.raw = raw

    @property
    def data(self) -> Array:
        data = self._data
        if data is None:
            assert self.raw is not None
            data = _array_from_raw(self.raw, self.datatype, self.shape)
            self._data = data
        return data

    def __repr__(self) -> str:
        form = "raw" if self.raw is not None else "array"
        return f"OutputTensor({self.name!r}, {self.datatype.wire}, {list(self.shape)}, {form})"


def _array_from_raw(raw: bytes, datatype: DataType, shape: tuple[int, ...]) -> Array:
    if datatype is DataType.BYTES:
        from server import _native  # the compiled codec; imported only for BYTES

        count = 1
        for d in shape:
            count *= d
        items = np.empty(count, dtype=object)
        items[:] = _native.decode_bytes(raw, count)
        return items.reshape(shape)
    if datatype is DataType.BOOL:
        return np.frombuffer(raw, dtype=np.uint8).view(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)


@dataclass(slots=True)
class InferResponse:
    model_name: str
    model_version: str
    id: str
    outputs: list[OutputTensor]
    parameters: dict[str, ParamValue] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RouteDecision:
    """Where the router sent a request: the variant of the routed model and its target."""

    route_model: str
    variant: str
    model: str
    version: str
    mirror: bool = False


class Execution(NamedTuple):
    """One backend call of a batch: its rows and requests, the nanoseconds spent packing the
    inputs, running the model and unpacking the outputs (wall clock, as Triton's statistics
    count them), the CPU time the calling thread spent on all three, and when packing began
    (perf_counter_ns; tracing places the call's span with it)."""

    rows: int
    requests: int
    input_ns: int
    infer_ns: int
    output_ns: int
    cpu_ns: int = 0
    start_ns: int = 0
