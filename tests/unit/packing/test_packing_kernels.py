"""The native packing kernels (server._native gather / gather_padded / scatter) against their
numpy oracles, bit for bit, on random inputs: every fixed-size dtype, odd shapes, zero-length
batches and requests, non-contiguous arrays and misaligned raw buffers."""

from __future__ import annotations

import itertools
import threading
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import _native
from server.packing.pool import ALIGNMENT, BufferPool, capacity_for, host_allocator
from server.packing.reference import concat_padded
from server.types import Array, DataType
from tests.concurrency import on_threads

#: Every fixed-size wire dtype (BF16 travels as '<u2', like UINT16).
DTYPES = sorted({dt.numpy_dtype.str for dt in DataType if dt is not DataType.BYTES})

# Above the native module's GIL-release threshold (64 KiB), so both code paths run.
BIG_ROWS = 70_000


def random_array(rng: np.random.Generator, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
    """Arbitrary bit patterns (NaNs and all), except BOOL which must hold 0/1 bytes."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = rng.integers(0, 256, nbytes, dtype=np.uint8)
    if dtype == np.bool_:
        raw &= 1
    return raw.view(dtype).reshape(shape)


def as_bytes(a: Array) -> bytes:
    return np.ascontiguousarray(a).tobytes()


def misaligned(a: Array) -> Array:
    """A C-contiguous copy of ``a`` whose data starts one byte past an aligned address."""
    raw = bytearray(a.nbytes + 1)
    view = np.frombuffer(memoryview(raw)[1:], dtype=a.dtype).reshape(a.shape)
    view[...] = a
    return view


def non_contiguous(a: Array) -> Array:
    """The same values, as a strided view into a larger array."""
    wide = np.zeros((a.shape[0] * 2, *a.shape[1:]), dtype=a.dtype)
    wide[::2] = a
    return wide[::2]


#: How each source is handed to gather: as the array, a strided view, a misaligned array,
#: raw bytes, or a memoryview at an odd offset into a larger bytes object.
FORMS = ("array", "strided", "misaligned", "bytes", "memoryview")


def in_form(a: Array, form: str) -> Any:
    if form == "array":
        return a
    if form == "strided":
        return non_contiguous(a)
    if form == "misaligned":
        return misaligned(a)
    if form == "bytes":
        return a.tobytes()
    return memoryview(b"x" + a.tobytes() + b"yz")[1:-2]


row_shapes = st.lists(st.integers(0, 4), min_size=0, max_size=3).map(tuple)


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    row_shape=row_shapes,
    rows=st.lists(st.integers(0, 5), min_size=0, max_size=8),
    forms=st.lists(st.sampled_from(FORMS), min_size=8, max_size=8),
    seed=st.integers(0, 2**32 - 1),
)
def test_gather_matches_concatenate(
    dtype: str, row_shape: tuple[int, ...], rows: list[int], forms: list[str], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    arrays = [random_array(rng, dt, (r, *row_shape)) for r in rows]
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dt.itemsize
    sources = []
    for a, form in zip(arrays, forms, strict=False):
        if form in ("bytes", "memoryview") and row_bytes == 0:
            form = "array"  # raw bytes of zero-size rows cannot say how many rows they hold
        sources.append(in_form(a, form))
    out = np.empty((sum(rows), *row_shape), dtype=dt)
    _native.gather(sources, out)
    want = np.concatenate(arrays) if arrays else np.empty((0, *row_shape), dtype=dt)
    assert out.dtype == want.dtype and out.shape == want.shape
    assert as_bytes(out) == as_bytes(want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gather_large_releases_the_gil_path(dtype: str) -> None:
    rng = np.random.default_rng(1)
    dt = np.dtype(dtype)
    arrays = [random_array(rng, dt, (BIG_ROWS // 4, 3)) for _ in range(4)]
    out = np.empty((BIG_ROWS // 4 * 4, 3), dtype=dt)
    _native.gather([arrays[0], arrays[1].tobytes(), misaligned(arrays[2]), arrays[3]], out)
    assert as_bytes(out) == as_bytes(np.concatenate(arrays))


def test_gather_converts_safely_and_refuses_lossy_casts() -> None:
    out = np.empty((3, 2), dtype=np.float32)
    _native.gather([np.ones((1, 2), np.float16), np.arange(4, dtype=np.int16).reshape(2, 2)], out)
    assert out.tolist() == [[1, 1], [0, 1], [2, 3]]
    with pytest.raises(TypeError, match="Cannot cast"):
        _native.gather([np.ones((3, 2), np.float64)], out)


@pytest.mark.parametrize(
    ("sources", "out", "message"),
    [
        ([np.ones((2, 3), np.float32)], np.empty((3, 3), np.float32), "hold 24 bytes; out has 36"),
        ([np.ones((4, 3), np.float32)], np.empty((3, 3), np.float32), "hold 48 bytes"),
        ([np.ones((1, 4), np.float32)], np.empty((1, 3), np.float32), r"shape \[1, 4\]"),
        ([np.ones((3,), np.float32)], np.empty((3, 1), np.float32), r"shape \[3\]"),
        ([b"\x00" * 5], np.empty((1, 1), np.float32), "not a whole number of 4-byte rows"),
    ],
)
def test_gather_rejects_what_does_not_fit(sources: list[Any], out: Array, message: str) -> None:
    before = out.copy()
    with pytest.raises(ValueError, match=message):
        _native.gather(sources, out)
    del before


def test_gather_rejects_unusable_destinations() -> None:
    src = [np.ones((2, 2), np.float32)]
    readonly = np.empty((2, 2), np.float32)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _native.gather(src, readonly)
    with pytest.raises(ValueError, match="C-contiguous"):
        _native.gather(src, np.empty((2, 4), np.float32)[:, ::2])
    with pytest.raises(ValueError, match="writeable, aligned"):
        _native.gather(src, misaligned(np.empty((2, 2), np.float32)))
    with pytest.raises(TypeError, match="Python objects"):
        _native.gather([np.array([b"x"], dtype=object)], np.empty(1, dtype=object))
    with pytest.raises(ValueError, match="batch dimension"):
        _native.gather([], np.empty((), np.float32))
    with pytest.raises(TypeError, match="numpy array"):
        _native.gather(src, bytearray(16))  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="list or tuple"):
        _native.gather(np.ones((2, 2), np.float32), np.empty((2, 2), np.float32))  # type: ignore[arg-type]


def test_gather_zero_length_batch() -> None:
    out = np.empty((0, 5), np.int64)
    _native.gather([], out)
    _native.gather([np.empty((0, 5), np.int64), b""], out)
    assert out.shape == (0, 5)  # nothing to copy, and nothing out of bounds touched


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    row_shape=row_shapes,
    rows=st.lists(st.integers(0, 5), min_size=1, max_size=8),
    strided=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_scatter_matches_slicing(
    dtype: str, row_shape: tuple[int, ...], rows: list[int], strided: bool, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    batch = random_array(rng, np.dtype(dtype), (sum(rows), *row_shape))
    source = non_contiguous(batch) if strided and batch.shape[0] else batch
    pieces = _native.scatter(source, rows)
    starts = np.cumsum([0, *rows])
    assert pieces == [batch[a:b].tobytes() for a, b in itertools.pairwise(starts)]
    assert all(type(p) is bytes for p in pieces)


def test_scatter_large_and_errors() -> None:
    batch = np.arange(BIG_ROWS * 2, dtype=np.float32).reshape(BIG_ROWS, 2)
    pieces = _native.scatter(batch, [1, BIG_ROWS - 3, 2])
    assert b"".join(pieces) == batch.tobytes()
    with pytest.raises(ValueError, match="add up to 3; the array has"):
        _native.scatter(batch, [1, 2])
    with pytest.raises(ValueError, match="more than the array"):
        _native.scatter(batch, [BIG_ROWS, 1])
    with pytest.raises(ValueError, match="non-negative"):
        _native.scatter(batch, [-1, BIG_ROWS + 1])
    with pytest.raises(TypeError, match="Python objects"):
        _native.scatter(np.array([b"a"], dtype=object), [1])
    with pytest.raises(ValueError, match="batch dimension"):
        _native.scatter(np.ones((), np.float32), [1])
    assert _native.scatter(np.empty((0, 3)), []) == []


@settings(max_examples=300, deadline=None)
@given(
    dtype=st.sampled_from(DTYPES),
    ndim=st.integers(1, 4),
    data=st.data(),
    seed=st.integers(0, 2**32 - 1),
)
def test_gather_padded_matches_oracle(dtype: str, ndim: int, data: st.DataObject,
                                      seed: int) -> None:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    count = data.draw(st.integers(0, 6))
    shapes = [tuple(data.draw(st.lists(st.integers(0, 4), min_size=ndim, max_size=ndim)))
              for _ in range(count)]
    arrays = [random_array(rng, dt, s) for s in shapes]
    forms = data.draw(st.lists(st.sampled_from(("array", "strided", "misaligned")),
                               min_size=count, max_size=count))
    extra = tuple(data.draw(st.lists(st.integers(0, 2), min_size=ndim - 1, max_size=ndim - 1)))
    inner = tuple(max((s[k] for s in shapes), default=0) + extra[k - 1] for k in range(1, ndim))
    shape = (sum(s[0] for s in shapes), *inner)
    pad = random_array(rng, dt, (1,))
    out = np.empty(shape, dtype=dt)
    sources = [non_contiguous(a) if f == "strided" and a.shape[0] else
               misaligned(a) if f == "misaligned" else a
               for a, f in zip(arrays, forms, strict=True)]
    _native.gather_padded(sources, out, pad.tobytes())
    want = concat_padded(arrays, pad[0], shape, dt)
    assert as_bytes(out) == as_bytes(want)


def test_gather_padded_errors_and_large() -> None:
    out = np.empty((3, 4), np.int32)
    with pytest.raises(ValueError, match="extent 5 in dimension 1, more than the batch's 4"):
        _native.gather_padded([np.ones((3, 5), np.int32)], out, bytes(4))
    with pytest.raises(ValueError, match="hold 2 rows; the batch has 3"):
        _native.gather_padded([np.ones((2, 4), np.int32)], out, bytes(4))
    with pytest.raises(ValueError, match="has 1 dimensions; the batch has 2"):
        _native.gather_padded([np.ones(3, np.int32)], out, bytes(4))
    with pytest.raises(ValueError, match="one element: 4 bytes"):
        _native.gather_padded([np.ones((3, 4), np.int32)], out, bytes(2))
    big = [np.full((BIG_ROWS // 2, 3), i, np.float32) for i in range(2)]
    wide = np.empty((BIG_ROWS // 2 * 2, 4), np.float32)
    _native.gather_padded(big, wide, np.float32(-1).tobytes())
    assert as_bytes(wide) == as_bytes(concat_padded(big, -1.0, wide.shape, wide.dtype))


def test_kernels_release_the_gil_and_run_concurrently() -> None:
    """Threads packing at once (one per backend instance) get their own correct results."""
    rng = np.random.default_rng(3)
    arrays = [random_array(rng, np.dtype("<f4"), (2_000, 16)) for _ in range(8)]
    want = np.concatenate(arrays).tobytes()
    failures: list[str] = []

    def work() -> None:
        for _ in range(20):
            out = np.empty((16_000, 16), np.float32)
            _native.gather(arrays, out)
            if out.tobytes() != want:
                failures.append("gather")
            if b"".join(_native.scatter(out, [2_000] * 8)) != want:
                failures.append("scatter")

    on_threads(work)
    assert not failures


# -- the buffer pool ---------------------------------------------------------------------------


def test_pool_reuses_and_grows() -> None:
    pool = BufferPool()
    buf, view = pool.take("x", np.dtype(np.float32), (4, 8))
    assert view.shape == (4, 8) and view.dtype == np.float32 and view.flags.c_contiguous
    assert view.ctypes.data % ALIGNMENT == 0 and view.flags.writeable
    pool.give("x", buf)
    again, _ = pool.take("x", np.dtype(np.float32), (2, 8))
    assert again is buf and pool.allocations == 1
    pool.give("x", again)
    bigger, view = pool.take("x", np.dtype(np.float32), (4096, 8))
    assert bigger is not buf and pool.allocations == 2 and bigger.nbytes >= view.nbytes
    pool.give("x", bigger)
    other, _ = pool.take("y", np.dtype(np.uint8), (0,))
    assert pool.allocations == 3 and pool.free_buffers("x") == 1
    del other


def test_pool_keeps_no_buffer_past_its_retention_cap() -> None:
    pool = BufferPool(retain_bytes=8192)
    small, _ = pool.take("x", np.dtype(np.uint8), (8192,))
    huge, _ = pool.take("x", np.dtype(np.uint8), (1 << 20,))
    pool.give("x", small)
    pool.give("x", huge)  # served its batch; dropped, not kept for ever
    assert pool.free_buffers("x") == 1 and pool.retained_bytes() == 8192
    again, _ = pool.take("x", np.dtype(np.uint8), (100,))
    assert again is small


def test_pool_capacity_and_allocator() -> None:
    assert capacity_for(0) == capacity_for(1) == 4096
    assert capacity_for(4097) == 8192 and capacity_for(8192) == 8192
    raw = host_allocator(100)
    assert raw.nbytes == 100 and raw.ctypes.data % ALIGNMENT == 0 and raw.dtype == np.uint8
    seen: list[int] = []

    def pinned(nbytes: int) -> Array:  # the GPU issue's hook: any aligned uint8 allocator
        seen.append(nbytes)
        return host_allocator(nbytes)

    pool = BufferPool(pinned)
    pool.take("x", np.dtype(np.float64), (3,))
    assert seen == [4096]


def test_pool_is_safe_across_threads() -> None:
    pool = BufferPool()
    in_use: set[int] = set()
    lock = threading.Lock()
    clashes: list[int] = []

    def work() -> None:
        for _ in range(2_000):
            buf, _ = pool.take("x", np.dtype(np.uint8), (64,))
            with lock:
                if id(buf) in in_use:
                    clashes.append(id(buf))
                in_use.add(id(buf))
            with lock:
                in_use.discard(id(buf))
            pool.give("x", buf)

    on_threads(work)
    assert not clashes
    assert pool.free_buffers("x") == pool.allocations <= 4


# -- hostile sizes: what a client's raw contents and shapes can make the kernels see ----------


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES), row_shape=row_shapes, out_rows=st.integers(0, 6),
       data=st.data(), seed=st.integers(0, 2**32 - 1))
def test_gather_of_raw_bytes_of_any_length_fills_out_exactly_or_refuses(
    dtype: str, row_shape: tuple[int, ...], out_rows: int, data: st.DataObject, seed: int
) -> None:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    row_bytes = int(np.prod(row_shape, dtype=np.int64)) * dt.itemsize
    lengths = data.draw(st.lists(st.integers(0, 3).map(lambda r: r * row_bytes)
                                 | st.integers(0, 40), max_size=5))
    sources = [rng.bytes(n) for n in lengths]
    out = np.zeros((out_rows, *row_shape), dtype=dt)
    whole_rows = all(n % row_bytes == 0 if row_bytes else n == 0 for n in lengths)
    if whole_rows and sum(lengths) == out.nbytes:
        _native.gather([memoryview(s) for s in sources], out)
        assert out.tobytes() == b"".join(sources)
    else:
        with pytest.raises(ValueError, match=r"rows|sources hold"):
            _native.gather(sources, out)


ROWS = (st.integers(-3, 8) | st.sampled_from([2**63 - 1, 2**63, 2**64, -(2**63)])
        | st.sampled_from([1.0, "1", None]))


def scatter_refusal(rows: list[Any], batch_rows: int) -> type[Exception] | None:
    """What scatter raises for ``rows``, checked in order as it does, or None."""
    total = 0
    for r in rows:
        if not isinstance(r, int):
            return TypeError
        total += r
        if r < 0 or r >= 2**63 or total > batch_rows:
            return ValueError
    return None if total == batch_rows else ValueError


@settings(max_examples=300, deadline=None)
@given(batch_rows=st.integers(0, 8), rows=st.lists(ROWS, max_size=5))
def test_scatter_of_any_rows_matches_slicing_or_refuses(batch_rows: int,
                                                        rows: list[Any]) -> None:
    batch = np.arange(batch_rows * 3, dtype=np.int16).reshape(batch_rows, 3)
    refusal = scatter_refusal(rows, batch_rows)
    if refusal is None:
        starts = np.cumsum([0, *rows])
        assert _native.scatter(batch, rows) == [batch[a:b].tobytes()
                                                for a, b in itertools.pairwise(starts)]
    else:
        with pytest.raises(refusal):
            _native.scatter(batch, rows)


@settings(max_examples=300, deadline=None)
@given(dtype=st.sampled_from(DTYPES),
       out_shape=st.lists(st.integers(0, 4), max_size=3).map(tuple),
       shapes=st.lists(st.lists(st.integers(0, 4), max_size=3).map(tuple), max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_gather_padded_of_any_shapes_matches_oracle_or_refuses(
    dtype: str, out_shape: tuple[int, ...], shapes: list[tuple[int, ...]], seed: int
) -> None:
    rng = np.random.default_rng(seed)
    dt = np.dtype(dtype)
    arrays = [random_array(rng, dt, s) for s in shapes]
    pad = random_array(rng, dt, (1,))
    out = np.empty(out_shape, dtype=dt)
    fits = (len(out_shape) >= 1
            and all(len(s) == len(out_shape) for s in shapes)
            and all(s[k] <= out_shape[k] for s in shapes for k in range(1, len(out_shape)))
            and sum(s[0] for s in shapes) == out_shape[0])
    if fits:
        _native.gather_padded(arrays, out, pad.tobytes())
        assert as_bytes(out) == as_bytes(concat_padded(arrays, pad[0], out_shape, dt))
    else:
        with pytest.raises(ValueError):
            _native.gather_padded(arrays, out, pad.tobytes())
