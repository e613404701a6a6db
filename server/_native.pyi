"""Type stub for the compiled extension ``server._native`` (built from csrc/bindings.cpp)."""

from collections.abc import Iterable, Sequence
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

_Param = tuple[int, bool | int | float | str | None]

MAX_REQUEST_ENTRIES: int

class TooManyEntries(ValueError): ...

def parse_infer_request(data: Buffer) -> tuple[
    str,
    str,
    str,
    dict[str, _Param],
    list[tuple[str, str, tuple[int, ...], dict[str, _Param], memoryview | bytes | None]],
    list[tuple[str, dict[str, _Param]]],
    list[memoryview],
]:
    """Parse a serialized ModelInferRequest without protobuf objects: ``(model_name,
    model_version, id, parameters, inputs, outputs, raw_input_contents)``, the form of
    server.codec.parsed. Raw contents and typed contents are read-only views of ``data``
    (typed contents are bytes when the field is repeated). ValueError names the problem and
    its offset in malformed bytes (what the protobuf runtime rejects)."""

def encode_infer_response(
    model_name: str,
    model_version: str,
    id: str,
    parameters: dict[str, bool | int | float | str],
    outputs: Sequence[tuple[str, str, Sequence[int], Buffer | NDArray[Any]]],
    stream: bool = False,
    error_message: str = "",
) -> bytes:
    """Serialize a ModelInferResponse (``stream``: wrapped as the infer_response of a
    ModelStreamInferResponse with ``error_message``) from ``outputs`` as ``(name, datatype,
    shape, raw)``; the bytes the protobuf runtime writes, map entries in dict order."""

def gather(sources: Sequence[NDArray[Any] | Buffer], out: NDArray[Any]) -> None:
    """Concatenate ``sources`` along axis 0 into ``out``, one memcpy each (GIL released for
    64 KiB or more). A source is an array with ``out``'s row shape (converted to its dtype by
    numpy's safe casting only when needed) or a buffer of raw rows. ``out`` must be
    writeable, aligned and C-contiguous, and the sources must fill it exactly (ValueError)."""

def gather_padded(sources: Sequence[NDArray[Any]], out: NDArray[Any], pad: bytes) -> None:
    """Ragged gather: each source anchored at index 0 of every axis after the first, the rest
    of ``out`` filled with the element ``pad`` (``out.itemsize`` bytes)."""

def scatter(array: NDArray[Any], rows: Sequence[SupportsIndex]) -> list[bytes]:
    """``array`` split along axis 0 into pieces of ``rows[i]`` rows, each as its C-order
    bytes (``array[a:b].tobytes()``), with no intermediate array."""

def hardware_threads() -> int:
    """The number of hardware threads (at least 1)."""

class ImagePreprocessor:
    """uint8 HWC images -> resize (bilinear) -> centre crop -> ``x * a + b`` -> FP32/FP16/
    BF16/FP64 in NCHW or NHWC, straight into a batch buffer (csrc/preprocess.hpp)."""

    def __init__(
        self,
        channels: int,
        out_h: int,
        out_w: int,
        *,
        resize: str = "none",
        resize_h: int = 0,
        resize_w: int = 0,
        shorter: int = 0,
        crop: bool = False,
        layout: str = "NCHW",
        output: str = "FP32",
        a: Sequence[float],
        b: Sequence[float],
        threads: int = 1,
    ) -> None: ...
    def run(
        self, images: Sequence[NDArray[Any]], out: NDArray[Any], batched: bool = True
    ) -> None:
        """Preprocess ``images`` ([n, H, W, C] each when ``batched``, else one [H, W, C])
        into ``out``; ValueError names an image of unusable size."""
    @property
    def threads(self) -> int: ...

class ArenaWriter:
    """A frontend's side of its request arena (csrc/arena.hpp): maps ``size`` bytes of the
    memfd ``fd`` and places messages in it. One thread only."""

    def __init__(self, fd: int, size: int) -> None: ...
    def place(self, data: Buffer) -> int:
        """Copy ``data`` into a free block (after reclaiming what the engine freed): the
        offset to send the engine, or -1 when no free range holds it."""
    def reclaim(self) -> None:
        """Take back the blocks the engine freed."""
    @property
    def size(self) -> int: ...
    @property
    def held(self) -> int:
        """Bytes of blocks placed and not yet seen free."""

class ArenaSlice(Buffer):
    """A message the engine took: a read-only buffer whose block is freed when the slice
    and every view of it are gone."""

    def __len__(self) -> int: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...

class ArenaReader:
    """The engine's side of a frontend's request arena."""

    def __init__(self, fd: int, size: int) -> None: ...
    def take(self, offset: int, length: int) -> ArenaSlice:
        """The message placed at ``offset``; ValueError unless ``offset`` and ``length``
        name a block the frontend placed and nobody took yet."""
    @property
    def size(self) -> int: ...
