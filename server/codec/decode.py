"""A parsed ModelInferRequest -> InferRequest, checking the request against itself.

Every check runs on the neutral parsed form (codec.parsed), whichever parser produced it.
Raw contents become numpy views over the request's bytes: no copy. Checks against the
model's config happen in codec.validate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from server import _native, classification
from server._pb import grpc_service_pb2 as pb
from server.codec import shared_memory
from server.codec.caps import NO_CAPS, RequestCaps, decoded_bytes
from server.codec.parsed import (
    INT64,
    Parameters,
    ParsedInput,
    ParsedRequest,
    TypedContents,
    from_message,
)
from server.codec.shared_memory import SharedMemoryScope, ShmRef
from server.errors import InvalidInput, Unsupported, byte_size_mismatch
from server.types import Array, DataType, InferRequest, ParamValue

#: The typed ``contents`` field that carries each datatype, and that field's numpy type.
TYPED_FIELDS: dict[DataType, str] = {
    DataType.BOOL: "bool_contents",
    DataType.UINT8: "uint_contents",
    DataType.UINT16: "uint_contents",
    DataType.UINT32: "uint_contents",
    DataType.UINT64: "uint64_contents",
    DataType.INT8: "int_contents",
    DataType.INT16: "int_contents",
    DataType.INT32: "int_contents",
    DataType.INT64: "int64_contents",
    DataType.FP32: "fp32_contents",
    DataType.FP64: "fp64_contents",
    DataType.BYTES: "bytes_contents",
}
_ALL_TYPED = frozenset(TYPED_FIELDS.values())
_SEQUENCE_PARAMETERS = ("sequence_id", "sequence_start", "sequence_end")


def decode_parameters(params: Parameters) -> dict[str, ParamValue]:
    values: dict[str, ParamValue] = {}
    for key, (_, value) in params.items():
        if value is None:
            raise InvalidInput("a parameter has no value set")
        values[key] = value
    return values


def _int_parameter(params: dict[str, ParamValue], key: str) -> int:
    value = params.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(f"parameter '{key}' must be an integer, got {value!r}")
    if value < 0:
        raise InvalidInput(f"parameter '{key}' must not be negative, got {value}")
    return value


def _shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if any(d < 0 for d in shape):
        raise InvalidInput(f"input '{name}' has a negative dimension in shape {list(shape)}")
    if not shape or math.prod(shape) == 0:
        raise InvalidInput(f"input '{name}' is empty: shape {list(shape)} holds no element")
    return shape


def _from_raw(
    model: str, name: str, datatype: DataType, shape: tuple[int, ...], raw: bytes | memoryview,
    shm_ref: ShmRef | None = None,
) -> Array:
    """``shm_ref``: where ``raw`` was read from, when it comes from shared memory."""
    count = math.prod(shape)
    if datatype is DataType.BYTES:
        try:
            items = _native.decode_bytes(raw, count)
        except ValueError as exc:
            if shm_ref is not None:
                # The codec's detail derives from the region's length prefixes, and a region
                # may hold bytes the caller could not read otherwise: name the window only.
                raise InvalidInput(
                    f"input '{name}' has malformed BYTES content: the {len(raw)} bytes at "
                    f"offset {shm_ref.offset} of shared memory region '{shm_ref.region}' are "
                    f"not {count} length-prefixed elements"
                ) from None
            raise InvalidInput(f"input '{name}' has malformed BYTES content: {exc}") from None
        array = np.empty(count, dtype=object)
        array[:] = items
        return array.reshape(shape)
    expected = count * datatype.itemsize
    if len(raw) != expected:
        raise byte_size_mismatch(model, name, datatype, shape, expected, len(raw),
                                 "raw content")
    if datatype is DataType.BOOL:
        as_bytes = np.frombuffer(raw, dtype=np.uint8)
        if as_bytes.max(initial=0) > 1:
            raise InvalidInput(f"input '{name}' is BOOL but holds bytes other than 0 and 1")
        return as_bytes.view(np.bool_).reshape(shape)
    return np.frombuffer(raw, dtype=datatype.numpy_dtype).reshape(shape)


def _from_typed(
    name: str, datatype: DataType, shape: tuple[int, ...], typed: TypedContents
) -> Array:
    contents = (
        typed if isinstance(typed, pb.InferTensorContents)
        else pb.InferTensorContents.FromString(typed)
    )
    field = TYPED_FIELDS.get(datatype)
    if field is None:
        raise InvalidInput(
            f"input '{name}' is {datatype.wire}, which has no typed contents field; "
            "send it in raw_input_contents"
        )
    for other in _ALL_TYPED - {field}:
        if len(getattr(contents, other)):
            raise InvalidInput(
                f"input '{name}' is {datatype.wire} and must use contents.{field}, "
                f"not contents.{other}"
            )
    values = getattr(contents, field)
    count = math.prod(shape)
    if len(values) != count:
        raise InvalidInput(
            f"input '{name}' contents.{field} has {len(values)} elements; shape "
            f"{list(shape)} needs {count}"
        )
    if datatype is DataType.BYTES:
        array = np.empty(count, dtype=object)
        array[:] = list(values)
        return array.reshape(shape)
    target = datatype.numpy_dtype
    if target.kind in "iu" and target.itemsize < 4:
        wide = np.asarray(values, dtype=np.int64)
        info = np.iinfo(target)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise InvalidInput(
                f"input '{name}' holds values outside the {datatype.wire} range "
                f"[{info.min}, {info.max}]"
            )
        return wide.astype(target).reshape(shape)
    return np.asarray(values, dtype=target).reshape(shape)


def decode_request(
    message: pb.ModelInferRequest,
    deadline_ns: int | None,
    shm: SharedMemoryScope | None = None,
    caps: RequestCaps = NO_CAPS,
) -> InferRequest:
    """Decode a message the protobuf runtime parsed (the pure-Python path)."""
    return decode_parsed(from_message(message), deadline_ns, shm, caps)


def decode_parsed(
    parsed: ParsedRequest,
    deadline_ns: int | None,
    shm: SharedMemoryScope | None = None,
    caps: RequestCaps = NO_CAPS,
) -> InferRequest:
    """``shm`` leases the shared-memory regions the request names (None: none registered).

    The caps are checked first, on the parsed form: a request past one is refused before any
    array or object is built from it. As in Triton, ``raw_input_contents`` holds one entry
    per input *not* in shared memory.
    """
    nbytes = decoded_bytes(parsed, caps)
    model_name, model_version, request_id, params, tensors, outputs, raw_contents = parsed
    use_raw = len(raw_contents) > 0
    raw_index = 0
    inputs: dict[str, Array] = {}
    types: dict[str, DataType] = {}
    for name, wire_type, dims, tensor_params, contents in tensors:
        if name in inputs:
            raise InvalidInput(f"input '{name}' appears twice in the request")
        shm_ref = shared_memory.tensor_reference(name, tensor_params) if tensor_params else None
        try:
            datatype = DataType.from_wire(wire_type)
        except ValueError:
            raise InvalidInput(f"input '{name}' has unknown datatype '{wire_type}'") from None
        shape = _shape(name, dims)
        if shm_ref is not None:
            if contents is not None:
                raise InvalidInput(
                    f"input '{name}': contents must not be set for an input in shared memory"
                )
            buffer = shared_memory.input_buffer(shm, model_name, name, datatype, shape, shm_ref)
            inputs[name] = _from_raw(model_name, name, datatype, shape, buffer, shm_ref)
        elif use_raw:
            if contents is not None:
                raise InvalidInput(
                    f"input '{name}': contents must not be set when raw_input_contents is used"
                )
            if raw_index >= len(raw_contents):
                raise _raw_count_error(tensors, len(raw_contents))
            inputs[name] = _from_raw(model_name, name, datatype, shape, raw_contents[raw_index])
            raw_index += 1
        else:
            if contents is None:
                raise InvalidInput(f"input '{name}' carries no data")
            inputs[name] = _from_typed(name, datatype, shape, contents)
        types[name] = datatype
    if raw_index != len(raw_contents):
        raise _raw_count_error(tensors, len(raw_contents))

    parameters = decode_parameters(params)
    for key in _SEQUENCE_PARAMETERS:
        if parameters.get(key):
            raise Unsupported(f"parameter '{key}': sequence batching is not supported")
    requested: tuple[str, ...] | None = None
    classes: dict[str, int] | None = None
    if outputs:
        names = []
        for output_name, output_params in outputs:
            if output_params:
                if classification.PARAMETER in output_params:
                    if classes is None:
                        classes = {}
                    classes[output_name] = _class_count(output_name, output_params)
                out_ref = shared_memory.tensor_reference(output_name, output_params)
                if out_ref is not None:
                    shared_memory.bind_output(shm, output_name, out_ref)
            names.append(output_name)
        if len(set(names)) != len(names):
            raise InvalidInput(f"requested outputs name a tensor twice: {names}")
        requested = tuple(names)
    return InferRequest(
        model_name=model_name,
        model_version=model_version,
        id=request_id,
        inputs=inputs,
        input_types=types,
        requested_outputs=requested,
        parameters=parameters,
        priority=_int_parameter(parameters, "priority"),
        timeout_us=_int_parameter(parameters, "timeout"),
        deadline_ns=deadline_ns,
        nbytes=nbytes,
        classification=classes,
    )


def _class_count(output: str, params: Parameters) -> int:
    """The requested output's ``classification`` parameter: how many classes (int64, > 0)."""
    member, value = params[classification.PARAMETER]
    if member != INT64 or not isinstance(value, int):
        raise InvalidInput(
            f"invalid value type for '{classification.PARAMETER}' parameter for tensor "
            f"'{output}', expected int64_param."
        )
    if value <= 0:
        raise InvalidInput(
            f"'{classification.PARAMETER}' for tensor '{output}' must be a positive class "
            f"count, got {value}"
        )
    return value


def _raw_count_error(inputs: Sequence[ParsedInput], entries: int) -> InvalidInput:
    in_memory = sum(1 for t in inputs if shared_memory.REGION in t[3])
    expected = len(inputs) - in_memory
    where = f" ({in_memory} are in shared memory)" if in_memory else ""
    return InvalidInput(f"raw_input_contents has {entries} entries for {expected} inputs{where}")
