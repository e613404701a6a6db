"""The native BYTES codec (server._native) against the plain-Python reference."""

from __future__ import annotations

import functools
import struct
import sys
from collections.abc import Callable, Iterable
from typing import Any, cast

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import _native as native
from server.codec import bytes_reference as reference
from tests.concurrency import on_threads

Decoder = Callable[[Any, Any], list[bytes]]
Encoder = Callable[[Any], bytes]

DECODERS: list[Decoder] = [native.decode_bytes, reference.decode_bytes]
ENCODERS: list[Encoder] = [native.encode_bytes, reference.encode_bytes]
IMPL_IDS = ["native", "reference"]

# Above the native module's GIL-release threshold (64 KiB), so both code paths run.
BIG = 256 * 1024


def prefix(n: int) -> bytes:
    return struct.pack("<I", n)


def enc(*elements: bytes) -> bytes:
    return b"".join(prefix(len(e)) + e for e in elements)


def outcome(fn: Callable[[], object]) -> tuple[str, object]:
    """("ok", result) or (exception type name, message)."""
    try:
        return "ok", fn()
    except Exception as exc:  # compared, never swallowed
        return type(exc).__name__, str(exc)


def assert_same_decode(buffer: Any, count: Any) -> tuple[str, object]:
    got = outcome(lambda: native.decode_bytes(buffer, count))
    want = outcome(lambda: reference.decode_bytes(buffer, count))
    assert got == want
    return got


def assert_same_encode(items_factory: Callable[[], Any]) -> tuple[str, object]:
    # A factory, so a one-shot iterable (a generator) is fresh for each implementation.
    got = outcome(lambda: native.encode_bytes(items_factory()))
    want = outcome(lambda: reference.encode_bytes(items_factory()))
    assert got == want
    return got


# --------------------------------------------------------------------------- encoding


ENCODE_CASES: list[tuple[str, list[Any], bytes]] = [
    ("zero elements", [], b""),
    ("one empty", [b""], prefix(0)),
    ("several empty", [b"", "", bytearray()], prefix(0) * 3),
    ("ascii", [b"ab", b"c"], prefix(2) + b"ab" + prefix(1) + b"c"),
    ("str ascii", ["hello"], prefix(5) + b"hello"),
    ("non-ascii str", ["é", "日本", "🦅"], enc("é".encode(), "日本".encode(), "🦅".encode())),
    ("nul bytes", [b"\x00\x00", "\x00"], enc(b"\x00\x00", b"\x00")),
    ("bytearray", [bytearray(b"xyz")], prefix(3) + b"xyz"),
    ("mixed", [b"a", "b", bytearray(b"c"), "ü"], enc(b"a", b"b", b"c", "ü".encode())),
    ("all byte values", [bytes(range(256))], prefix(256) + bytes(range(256))),
    ("large element", [b"\xab" * BIG], prefix(BIG) + b"\xab" * BIG),
    ("many elements", [b"x" * 1000] * 300, enc(*[b"x" * 1000] * 300)),
]


@pytest.mark.parametrize("encode", ENCODERS, ids=IMPL_IDS)
@pytest.mark.parametrize(
    ("items", "expected"), [c[1:] for c in ENCODE_CASES], ids=[c[0] for c in ENCODE_CASES]
)
def test_encode_known(encode: Encoder, items: list[Any], expected: bytes) -> None:
    assert encode(items) == expected
    assert encode(tuple(items)) == expected
    assert encode(iter(items)) == expected


@pytest.mark.parametrize("encode", ENCODERS, ids=IMPL_IDS)
def test_encode_returns_exact_bytes(encode: Encoder) -> None:
    out = encode([b"a"])
    assert type(out) is bytes


@pytest.mark.parametrize("encode", ENCODERS, ids=IMPL_IDS)
def test_encode_numpy_arrays(encode: Encoder) -> None:
    objects = np.array([b"ab", "é", bytearray(b"c"), b""], dtype=object)
    assert encode(objects) == enc(b"ab", "é".encode(), b"c", b"")
    assert encode(np.empty(0, dtype=object)) == b""
    # Fixed-width numpy arrays iterate as numpy.bytes_ / numpy.str_ (subclasses).
    assert encode(np.array([b"ab", b"c"])) == enc(b"ab", b"c")
    assert encode(np.array(["ab", "ü"])) == enc(b"ab", "ü".encode())
    # A raveled 2-D object array gives row-major order.
    grid = np.array([[b"a", b"b"], [b"c", b"d"]], dtype=object)
    assert encode(grid.ravel()) == enc(b"a", b"b", b"c", b"d")


@pytest.mark.parametrize("encode", ENCODERS, ids=IMPL_IDS)
def test_encode_subclasses(encode: Encoder) -> None:
    class B(bytes):
        pass

    class S(str):
        pass

    class BA(bytearray):
        pass

    assert encode([B(b"ab"), S("cd"), BA(b"e")]) == enc(b"ab", b"cd", b"e")


@pytest.mark.parametrize(
    ("items", "fragment"),
    [
        ([1], "element 0 has type int"),
        ([b"ok", None], "element 1 has type NoneType"),
        ([b"ok", "ok", 2.5], "element 2 has type float"),
        ([memoryview(b"x")], "element 0 has type memoryview"),
        ([[b"nested"]], "element 0 has type list"),
        ([np.uint8(3)], "element 0 has type uint8"),
        (np.array([[b"a"], [b"b"]], dtype=object), "element 0 has type ndarray"),
        ("abc", "not str"),
        (b"abc", "not bytes"),
        (bytearray(b"abc"), "not bytearray"),
        (memoryview(b"abc"), "not memoryview"),
        (5, "items must be a sequence"),
        (None, "items must be a sequence"),
    ],
)
def test_encode_type_errors(items: Any, fragment: str) -> None:
    for encode in ENCODERS:
        with pytest.raises(TypeError, match=fragment):
            encode(items)
    assert assert_same_encode(lambda: items)[0] == "TypeError"


def test_encode_type_error_reports_first_bad_element() -> None:
    # The type check runs before any size check, in both implementations.
    kind, message = assert_same_encode(lambda: [b"a", 1, None])
    assert kind == "TypeError"
    assert "element 1 has type int" in str(message)


def test_encode_lone_surrogate() -> None:
    for encode in ENCODERS:
        with pytest.raises(UnicodeEncodeError):
            encode(["ok", "\ud800"])


def test_encode_releases_bytearray_exports() -> None:
    big = bytearray(b"q" * BIG)
    small = bytearray(b"q")
    native.encode_bytes([big, small])
    native.encode_bytes([small])
    big.extend(b"more")  # BufferError if an export had leaked
    small.extend(b"more")
    with pytest.raises(TypeError):
        native.encode_bytes([bytearray(b"x"), cast(Any, 1)])  # error path releases too
    small.clear()


def test_encode_does_not_leak_references() -> None:
    item = b"some payload" * 3
    text = "non-ascii ü"
    before = (sys.getrefcount(item), sys.getrefcount(text))
    for _ in range(100):
        native.encode_bytes([item, text, item])
        native.encode_bytes([item] * 10_000)  # GIL-release path
        with pytest.raises(TypeError):
            native.encode_bytes([item, text, cast(Any, object())])
    assert (sys.getrefcount(item), sys.getrefcount(text)) == before


# --------------------------------------------------------------------------- decoding


DECODE_CASES: list[tuple[str, list[bytes]]] = [
    ("zero elements", []),
    ("one empty", [b""]),
    ("several empty", [b"", b"", b""]),
    ("ascii", [b"ab", b"c"]),
    ("non-ascii", ["é".encode(), "日本".encode(), "🦅".encode()]),
    ("nul and high bytes", [b"\x00", b"\xff" * 7, bytes(range(256))]),
    ("large element", [b"\x01" * BIG]),
    ("large then empty", [b"\x02" * BIG, b"", b"x"]),
    ("many elements", [bytes([i % 256]) * (i % 17) for i in range(5000)]),
]


def buffer_variants(raw: bytes) -> list[tuple[str, Any]]:
    strided = np.zeros(2 * len(raw), dtype=np.uint8)
    strided[::2] = np.frombuffer(raw, dtype=np.uint8)
    variants: list[tuple[str, Any]] = [
        ("bytes", raw),
        ("bytearray", bytearray(raw)),
        ("memoryview", memoryview(raw)),
        ("memoryview slice", memoryview(b"##" + raw + b"##")[2 : 2 + len(raw)]),
        ("numpy uint8", np.frombuffer(raw, dtype=np.uint8)),
        ("numpy strided", strided[::2]),
        ("memoryview strided", memoryview(cast(Any, strided))[::2]),
    ]
    if len(raw) % 4 == 0 and raw:
        variants.append(("numpy 2-D uint32", np.frombuffer(raw, dtype="<u4").reshape(1, -1)))
    return variants


@pytest.mark.parametrize("decode", DECODERS, ids=IMPL_IDS)
@pytest.mark.parametrize("elements", [c[1] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_decode_known(decode: Decoder, elements: list[bytes]) -> None:
    raw = enc(*elements)
    for name, buffer in buffer_variants(raw):
        got = decode(buffer, len(elements))
        assert got == elements, name
        assert all(type(e) is bytes for e in got), name
    assert type(decode(raw, len(elements))) is list


def test_decode_count_accepts_index_types() -> None:
    raw = enc(b"a", b"b")
    for decode in DECODERS:
        assert decode(raw, np.int64(2)) == [b"a", b"b"]
        assert decode(enc(b"z"), True) == [b"z"]


@pytest.mark.parametrize(
    ("buffer", "count", "fragment"),
    [
        # ends inside a length prefix
        (b"\x01", 1, "buffer ends inside the length prefix of element 0 (offset 0: 1 of 4"),
        (b"\x01\x00\x00", 1, "length prefix of element 0 (offset 0: 3 of 4 bytes present)"),
        (enc(b"ab") + b"\x05\x00", 2, "length prefix of element 1 (offset 6: 2 of 4"),
        (enc(b"a", b"bb") + b"\x00", 3, "length prefix of element 2 (offset 11: 1 of 4"),
        # declared length runs past the end
        (prefix(10) + b"abcd", 1, "element 0 declares 10 bytes but only 4 remain at offset 4"),
        (
            enc(b"x", b"y", b"z") + prefix(10) + b"abcd",
            4,
            "element 3 declares 10 bytes but only 4 remain at offset 19",
        ),
        (prefix(1), 1, "element 0 declares 1 bytes but only 0 remain at offset 4"),
        (b"\xff\xff\xff\xff" + b"abc", 1, "element 0 declares 4294967295 bytes but only 3 remain"),
        (prefix(0x8000_0000), 1, "declares 2147483648 bytes but only 0 remain"),
        # trailing bytes
        (
            enc(b"a") + b"\x00\x00\x00",
            1,
            "expected 1 elements, buffer holds trailing 3 bytes after element 0 at offset 5",
        ),
        (
            enc(b"a", b"b", b"c", b"d", b"e") + b"xyz",
            5,
            "expected 5 elements, buffer holds trailing 3 bytes after element 4",
        ),
        (enc(b"a", b"b"), 1, "trailing 5 bytes after element 0 at offset 5"),
        (b"abc", 0, "expected 0 elements, buffer holds trailing 3 bytes at offset 0"),
        (enc(b""), 0, "expected 0 elements, buffer holds trailing 4 bytes"),
        # too few elements
        (b"", 1, "expected 1 elements, buffer holds only 0 (0 bytes)"),
        (enc(b"a", b"b", b"c"), 5, "expected 5 elements, buffer holds only 3 (15 bytes)"),
        (enc(b"a"), 10**12, "expected 1000000000000 elements, buffer holds only 1"),
        # bad count
        (b"", -1, "count must be non-negative, got -1"),
        (enc(b"a"), -(10**30), "count must be non-negative"),
        (b"", 2**64, "count 18446744073709551616 is too large"),
        (b"", 2**63, "is too large"),
    ],
)
def test_decode_malformed(buffer: bytes, count: int, fragment: str) -> None:
    for decode in DECODERS:
        with pytest.raises(ValueError) as info:
            decode(buffer, count)
        assert fragment in str(info.value), decode
    assert assert_same_decode(buffer, count)[0] == "ValueError"


@pytest.mark.parametrize(
    ("buffer", "count"),
    [
        ("text", 0),
        ([1, 2], 0),
        (None, 0),
        (5, 0),
        (np.array([b"a"], dtype=object), 0),  # exports PyObject pointers
        (b"", 1.0),
        (b"", "1"),
        (b"", None),
    ],
)
def test_decode_type_errors(buffer: Any, count: Any) -> None:
    for decode in DECODERS:
        with pytest.raises(TypeError):
            decode(buffer, count)


def test_decode_releases_buffer_exports() -> None:
    for size in (1, BIG):
        ba = bytearray(enc(b"q" * size))
        native.decode_bytes(ba, 1)
        with pytest.raises(ValueError):
            native.decode_bytes(ba, 2)
        ba.extend(b"x")  # BufferError if an export had leaked


def test_decode_concurrently() -> None:
    # The big buffers are scanned with the GIL released: exercise that path from threads.
    elements = [bytes([i % 251]) * (i % 300) for i in range(3000)]
    raw = enc(*elements)
    assert len(raw) > BIG
    failures: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(20):
                assert native.decode_bytes(raw, len(elements)) == elements
                assert native.encode_bytes(elements) == raw
        except BaseException as exc:  # reported below
            failures.append(exc)

    on_threads(work)
    assert not failures


# --------------------------------------------------------------------------- properties

element_lists = st.lists(
    st.one_of(
        st.binary(max_size=64),
        st.text(max_size=16),
        st.binary(min_size=256, max_size=2048),
    ),
    max_size=40,
)


def as_bytes(items: Iterable[bytes | str]) -> list[bytes]:
    return [i.encode() if isinstance(i, str) else i for i in items]


@settings(max_examples=300, deadline=None)
@given(element_lists)
def test_roundtrip(items: list[bytes | str]) -> None:
    raw = native.encode_bytes(items)
    assert raw == reference.encode_bytes(items)
    expected = as_bytes(items)
    assert native.decode_bytes(raw, len(items)) == expected
    assert reference.decode_bytes(raw, len(items)) == expected
    assert native.decode_bytes(memoryview(raw), len(items)) == expected
    assert native.encode_bytes(np.array([*items, b""], dtype=object)[:-1]) == raw


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=64), st.integers(min_value=-2, max_value=20))
def test_random_buffers_agree(buffer: bytes, count: int) -> None:
    kind, _ = assert_same_decode(buffer, count)
    assert kind in ("ok", "ValueError")


@st.composite
def mutated_encodings(draw: st.DrawFn) -> tuple[bytes, int]:
    """A valid encoding, then maybe damaged: truncated, extended, overwritten, miscounted."""
    items = draw(st.lists(st.binary(max_size=12), max_size=8))
    raw = bytearray(enc(*items))
    count = len(items)
    for _ in range(draw(st.integers(min_value=0, max_value=3))):
        action = draw(st.sampled_from(["truncate", "extend", "overwrite", "recount"]))
        if action == "truncate" and raw:
            del raw[draw(st.integers(min_value=0, max_value=len(raw) - 1)) :]
        elif action == "extend":
            raw += draw(st.binary(min_size=1, max_size=8))
        elif action == "overwrite" and raw:
            raw[draw(st.integers(min_value=0, max_value=len(raw) - 1))] = draw(
                st.integers(min_value=0, max_value=255)
            )
        elif action == "recount":
            count = max(0, count + draw(st.integers(min_value=-2, max_value=2)))
    return bytes(raw), count


@settings(max_examples=1000, deadline=None)
@given(mutated_encodings())
def test_mutated_encodings_agree(case: tuple[bytes, int]) -> None:
    buffer, count = case
    kind, result = assert_same_decode(buffer, count)
    assert kind in ("ok", "ValueError")
    if kind == "ok":
        assert isinstance(result, list)
        assert native.encode_bytes(result) == buffer  # a valid buffer re-encodes exactly


@st.composite
def hostile_decodes(draw: st.DrawFn) -> tuple[bytes, int]:
    """A (maybe damaged) encoding — sometimes of elements large enough that the scan runs
    without the GIL — and a count that may be anything an int64 shape product gives."""
    buffer, count = draw(mutated_encodings())
    if draw(st.integers(0, 9)) == 0:
        big = enc(b"\x07" * BIG)
        buffer, count = big + buffer, count + 1
        if draw(st.booleans()):
            buffer = buffer[:draw(st.integers(0, len(buffer)))]
    return buffer, draw(st.just(count) | st.sampled_from(
        [count + 1, len(buffer) // 4, len(buffer) // 4 + 1, 2**31, 2**62, 2**63 - 1, 2**63]))


@settings(max_examples=200, deadline=None)
@given(hostile_decodes())
def test_hostile_buffers_and_counts_agree_in_every_buffer_kind(case: tuple[bytes, int]) -> None:
    buffer, count = case
    want = assert_same_decode(buffer, count)
    assert want[0] in ("ok", "ValueError")
    for name, variant in buffer_variants(buffer):
        assert outcome(functools.partial(native.decode_bytes, variant, count)) == want, name
