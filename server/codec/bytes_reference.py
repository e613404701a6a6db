"""Plain-Python reference (the oracle) for the BYTES tensor codec in ``server._native``.

A BYTES tensor's raw content is the concatenation, in row-major order, of its elements,
each encoded as a 4-byte unsigned little-endian length followed by that many bytes.
Both functions raise the same exception types, with the same messages, as the native ones.
"""

from __future__ import annotations

import operator
import struct
import sys
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, SupportsIndex, cast

if TYPE_CHECKING:
    from numpy.typing import NDArray
    from typing_extensions import Buffer

__all__ = ["MAX_ELEMENT_SIZE", "decode_bytes", "encode_bytes"]

#: Longest element a 4-byte length prefix can describe.
MAX_ELEMENT_SIZE = 0xFFFF_FFFF

_PREFIX = struct.Struct("<I")
_PREFIX_SIZE = _PREFIX.size


def decode_bytes(buffer: Buffer | NDArray[Any], count: SupportsIndex) -> list[bytes]:
    """Decode exactly ``count`` length-prefixed elements from ``buffer``.

    ``buffer`` is any buffer-protocol object, read as flat bytes in C order.
    Raises ValueError for a negative ``count`` or a malformed buffer, TypeError for an
    object that is not a buffer or that exports Python objects (a numpy object array).
    """
    expected = operator.index(count)
    if expected < 0:
        raise ValueError(f"count must be non-negative, got {expected}")
    if expected > sys.maxsize:
        raise ValueError(f"count {expected} is too large")
    # A numpy array is a buffer at run time; only its Python 3.11 stubs lack __buffer__.
    with memoryview(cast("Buffer", buffer)) as view:
        if view.format == "O":
            raise TypeError("buffer holds Python objects (format 'O'), not raw bytes")
        data = view.tobytes()
    size = len(data)

    elements: list[bytes] = []
    pos = 0
    for index in range(expected):
        left = size - pos
        if left == 0:
            raise ValueError(
                f"expected {expected} elements, buffer holds only {index} ({pos} bytes)"
            )
        if left < _PREFIX_SIZE:
            raise ValueError(
                f"buffer ends inside the length prefix of element {index} "
                f"(offset {pos}: {left} of 4 bytes present)"
            )
        (length,) = _PREFIX.unpack_from(data, pos)
        pos += _PREFIX_SIZE
        available = size - pos
        if length > available:
            raise ValueError(
                f"element {index} declares {length} bytes but only {available} remain "
                f"at offset {pos}"
            )
        elements.append(data[pos : pos + length])
        pos += length

    if pos != size:
        trailing = size - pos
        if expected == 0:
            raise ValueError(
                f"expected 0 elements, buffer holds trailing {trailing} bytes at offset {pos}"
            )
        raise ValueError(
            f"expected {expected} elements, buffer holds trailing {trailing} bytes "
            f"after element {expected - 1} at offset {pos}"
        )
    return elements


def encode_bytes(items: Iterable[bytes | bytearray | str]) -> bytes:
    """Encode ``items`` (bytes, bytearray or str, the last as UTF-8) as BYTES tensor content.

    Raises TypeError naming the index and type of the first element of another type (or if
    ``items`` is itself a str or bytes-like object) and ValueError for an element longer
    than ``MAX_ELEMENT_SIZE`` bytes.
    """
    if isinstance(items, (str, bytes, bytearray, memoryview)):
        raise TypeError(
            "items must be a sequence of bytes, bytearray or str elements, not "
            f"{type(items).__name__}"
        )
    try:
        elements = list(items)
    except TypeError:
        raise TypeError("items must be a sequence of bytes, bytearray or str elements") from None

    payloads: list[bytes] = []
    for index, item in enumerate(elements):
        if isinstance(item, (bytes, bytearray)):
            payloads.append(bytes(item))
        elif isinstance(item, str):
            payloads.append(item.encode("utf-8"))
        else:
            raise TypeError(
                f"element {index} has type {type(item).__name__}; expected bytes, bytearray or str"
            )

    parts: list[bytes] = []
    for index, payload in enumerate(payloads):
        if len(payload) > MAX_ELEMENT_SIZE:
            raise ValueError(
                f"element {index} is {len(payload)} bytes, more than the {MAX_ELEMENT_SIZE} "
                "a BYTES length prefix can hold"
            )
        parts.append(_PREFIX.pack(len(payload)))
        parts.append(payload)
    return b"".join(parts)
