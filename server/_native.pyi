"""Type stub for the compiled extension ``server._native`` (built from csrc/bindings.cpp)."""

from collections.abc import Iterable
from typing import Any, SupportsIndex

from numpy.typing import NDArray
from typing_extensions import Buffer

def decode_bytes(buffer: Buffer | NDArray[Any], count: SupportsIndex) -> list[bytes]:
    """Decode exactly ``count`` length-prefixed BYTES elements from ``buffer``.

    Raises ValueError for a negative ``count`` or a malformed buffer, TypeError for an
    object that is not a buffer or that exports Python objects (a numpy object array).
    """

def encode_bytes(items: Iterable[bytes | bytearray | str]) -> bytes:
    """Encode ``items`` (bytes, bytearray or str, the last as UTF-8) as BYTES tensor content.

    Raises TypeError naming the index and type of an element of another type and
    ValueError for an element longer than 4294967295 bytes.
    """
