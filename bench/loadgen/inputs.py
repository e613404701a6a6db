"""Request data: random tensors shaped from a model's metadata, or tensors read from a file.

Either way the result is a list of :class:`InputTensor` holding the raw little-endian bytes
the wire carries (BYTES elements as 4-byte length prefixes followed by the bytes), so the
request can be serialised once and sent many times.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

#: V2 datatype -> numpy dtype (little-endian). BYTES is object; BF16 has no numpy type.
NUMPY_DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(np.object_),
}
DATATYPES: tuple[str, ...] = (*NUMPY_DTYPES, "BF16")


class InputError(ValueError):
    """Request data that cannot be built; the message says which input and why."""


@dataclass(frozen=True, slots=True)
class TensorMeta:
    """One input as ModelMetadata describes it; -1 marks a variable dimension."""

    name: str
    datatype: str
    shape: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class InputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    raw: bytes

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def datatype_of(dtype: np.dtype[Any]) -> str:
    if dtype.kind in ("O", "S", "U"):
        return "BYTES"
    for name, candidate in NUMPY_DTYPES.items():
        if name != "BYTES" and candidate == dtype.newbyteorder("<"):
            return name
    raise InputError(f"no V2 datatype for numpy dtype {dtype}")


def serialize_bytes(array: npt.NDArray[Any]) -> bytes:
    """BYTES elements as the wire carries them: uint32 little-endian length, then the bytes."""
    parts: list[bytes] = []
    for item in array.reshape(-1):
        data = item if isinstance(item, bytes) else str(item).encode("utf-8")
        parts.append(len(data).to_bytes(4, "little"))
        parts.append(data)
    return b"".join(parts)


def tensor_from_array(
    name: str, array: npt.NDArray[Any], datatype: str | None = None
) -> InputTensor:
    """Convert ``array`` to ``datatype`` (default: its own) and keep its wire bytes."""
    datatype = datatype or datatype_of(array.dtype)
    shape = tuple(int(d) for d in array.shape)
    if datatype == "BYTES":
        return InputTensor(name, datatype, shape, serialize_bytes(np.asarray(array, dtype=object)))
    if datatype == "BF16":
        as_f32 = np.ascontiguousarray(array, dtype="<f4")
        raw = (as_f32.view("<u4") >> 16).astype("<u2").tobytes()
        return InputTensor(name, datatype, shape, raw)
    if datatype not in NUMPY_DTYPES:
        raise InputError(f"input '{name}': unknown datatype '{datatype}'")
    converted = np.ascontiguousarray(array, dtype=NUMPY_DTYPES[datatype])
    return InputTensor(name, datatype, shape, converted.tobytes())


# -- random data ------------------------------------------------------------------------------


def resolve_shape(
    meta: TensorMeta,
    batch_size: int,
    override: Sequence[int] | None = None,
    dynamic_dim: int = 1,
    batched: bool | None = None,
) -> tuple[int, ...]:
    """The concrete shape of one request's tensor.

    A leading -1 is the batch dimension when ``batched`` (default: whenever the first dim is
    -1) and takes ``batch_size``. ``override`` replaces the dims after the batch dimension
    (all dims for a model that does not batch); remaining -1 dims take ``dynamic_dim``.
    """
    dims = list(meta.shape)
    if batched is None:
        batched = bool(dims) and dims[0] == -1
    head = [batch_size] if batched else []
    rest = dims[1:] if batched else dims
    if override is not None:
        if len(override) != len(rest) and rest:
            raise InputError(
                f"input '{meta.name}': --shape gives {len(override)} dims, the model has "
                f"{len(rest)} after the batch dimension ({meta.shape})"
            )
        for given, declared in zip(override, rest, strict=False):
            if declared != -1 and given != declared:
                raise InputError(
                    f"input '{meta.name}': --shape dim {given} differs from the model's {declared}"
                )
        rest = list(override)
    resolved = head + [dynamic_dim if d == -1 else d for d in rest]
    if any(d < 0 for d in resolved):
        raise InputError(f"input '{meta.name}': negative dimension in {resolved}")
    return tuple(resolved)


def random_array(
    datatype: str, shape: Sequence[int], rng: np.random.Generator
) -> npt.NDArray[Any]:
    """Values that every model accepts: floats in [0, 1), integers in [0, 100), short ASCII."""
    if datatype == "BOOL":
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    if datatype in ("FP16", "FP32", "FP64", "BF16"):
        dtype = NUMPY_DTYPES.get(datatype, np.dtype("<f4"))
        return rng.random(size=shape).astype(dtype)
    if datatype == "BYTES":
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        words = ["".join(rng.choice(letters, size=8)) for _ in range(int(np.prod(shape)))]
        return np.array([w.encode() for w in words], dtype=object).reshape(shape)
    if datatype in NUMPY_DTYPES:
        return rng.integers(0, 100, size=shape).astype(NUMPY_DTYPES[datatype])
    raise InputError(f"unknown datatype '{datatype}'")


def random_inputs(
    metas: Sequence[TensorMeta],
    batch_size: int = 1,
    shapes: Mapping[str, Sequence[int]] | None = None,
    dynamic_dim: int = 1,
    seed: int = 0,
    batched: bool | None = None,
) -> list[InputTensor]:
    rng = np.random.default_rng(seed)
    shapes = shapes or {}
    unknown = set(shapes) - {m.name for m in metas}
    if unknown:
        raise InputError(f"--shape names unknown inputs: {', '.join(sorted(unknown))}")
    tensors = []
    for meta in metas:
        shape = resolve_shape(meta, batch_size, shapes.get(meta.name), dynamic_dim, batched)
        tensors.append(tensor_from_array(meta.name, random_array(meta.datatype, shape, rng),
                                         meta.datatype))
    return tensors


# -- files ------------------------------------------------------------------------------------


def _json_inputs(document: Any) -> list[tuple[str, npt.NDArray[Any], str | None]]:
    """A V2 (KServe) JSON inference request body: {"inputs": [{name, datatype, shape, data}]}."""
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list):
        raise InputError('a JSON input file is a V2 request body: {"inputs": [...]}')
    found: list[tuple[str, npt.NDArray[Any], str | None]] = []
    for entry in document["inputs"]:
        try:
            name, datatype = str(entry["name"]), str(entry["datatype"]).upper()
            shape = [int(d) for d in entry["shape"]]
            data = entry["data"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"JSON input entry {entry!r}: {exc}") from None
        if datatype == "BYTES":
            array = np.array([str(v).encode() for v in np.ravel(np.array(data, dtype=object))],
                             dtype=object)
        else:
            array = np.array(data, dtype=NUMPY_DTYPES.get(datatype, np.dtype("<f4")))
        if array.size != int(np.prod(shape)):
            raise InputError(f"input '{name}': {array.size} values do not fill shape {shape}")
        found.append((name, array.reshape(shape), datatype))
    return found


def load_input_file(
    path: Path, metas: Sequence[TensorMeta] | None = None, input_name: str | None = None
) -> list[InputTensor]:
    """Tensors from ``.npy`` (one input), ``.npz`` (one array per input name) or ``.json``.

    Arrays carry the full request shape, batch dimension included. When ``metas`` is known,
    each array is converted to the datatype the model declares and unknown names are errors.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = np.load(path, allow_pickle=False)
            name = input_name or (metas[0].name if metas and len(metas) == 1 else None)
            if name is None:
                raise InputError(f"{path}: a .npy file needs --input-name for a model with "
                                 "several inputs")
            found: list[tuple[str, npt.NDArray[Any], str | None]] = [(name, array, None)]
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as archive:
                found = [(key, archive[key], None) for key in archive.files]
        elif suffix == ".json":
            found = _json_inputs(json.loads(path.read_text(encoding="utf-8")))
        else:
            raise InputError(f"{path}: input files are .npy, .npz or .json")
    except (OSError, ValueError) as exc:
        if isinstance(exc, InputError):
            raise
        raise InputError(f"{path}: {exc}") from None
    declared = {m.name: m.datatype for m in metas} if metas else {}
    if declared:
        unknown = [name for name, _, _ in found if name not in declared]
        if unknown:
            raise InputError(f"{path}: the model has no input named {', '.join(unknown)}")
    return [tensor_from_array(name, array, declared.get(name) or datatype)
            for name, array, datatype in found]
