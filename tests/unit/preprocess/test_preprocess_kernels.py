"""The native image preprocessing (server._native.ImagePreprocessor) against its numpy oracle
(server/preprocess/reference.py) on random images and pipelines.

Tolerance: none. Both compute source coordinates in float64 and interpolation and
normalisation in float32, with the same operations in the same order, and the extension is
built with -ffp-contract=off (no fused multiply-adds), so they agree bit for bit — for plain
normalisation, crops and bilinear resizes alike, in every output type. Should a build ever
contract (e.g. -march=native with FMA), the bilinear path may differ by an ulp or two of the
float32 result (each lerp rounds once instead of twice); ``RESIZE_TOLERANCE`` records the
bound we would then accept, and the tests report any difference before applying it.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from server import _native
from server.preprocess import native_preprocessor
from server.preprocess.reference import (
    axis_taps,
    cast_output,
    preprocess_batch,
    preprocess_image,
    to_bfloat16_bits,
)
from server.spec import ImagePreprocess, TensorSpec
from server.types import Array, DataType

OUTPUT_TYPES = [DataType.FP32, DataType.FP16, DataType.BF16, DataType.FP64]
#: Accepted only if a build contracts FMAs (see the module docstring); currently unused: 0 ulp.
RESIZE_TOLERANCE = {"rtol": 1e-6, "atol": 1e-5}


def model_input(pre: ImagePreprocess, channels: int, h: int, w: int,
                datatype: DataType = DataType.FP32) -> TensorSpec:
    dims = (channels, h, w) if pre.layout == "NCHW" else (h, w, channels)
    return TensorSpec(pre.input, datatype, dims)


def run_native(pre: ImagePreprocess, tensor: TensorSpec, images: list[Array],
               batched: bool = True) -> Array:
    native = native_preprocessor(pre, tensor)
    count = sum(int(i.shape[0]) for i in images) if batched else 0
    shape = (count, *tensor.dims) if batched else tensor.dims
    out = np.full(shape, 7, dtype=tensor.datatype.numpy_dtype)  # garbage the kernel overwrites
    native.run(images, out, batched)
    return out


def assert_same_bits(got: Array, want: Array) -> None:
    assert got.dtype == want.dtype and got.shape == want.shape
    if got.tobytes() != want.tobytes():
        diff = np.argwhere(got.view(np.uint8) != want.view(np.uint8))
        raise AssertionError(f"{len(diff)} bytes differ, first at {diff[:3].tolist()}: "
                             f"got {got.ravel()[:8]}, want {want.ravel()[:8]}")


@st.composite
def pipelines(draw: st.DrawFn) -> tuple[ImagePreprocess, TensorSpec, list[tuple[int, int, int]]]:
    channels = draw(st.integers(1, 4))
    layout = draw(st.sampled_from(["NCHW", "NHWC"]))
    out_h, out_w = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mode = draw(st.sampled_from(["none", "crop", "exact", "exact+crop", "shorter"]))
    resize: tuple[int, int] | None = None
    shorter: int | None = None
    crop: tuple[int, int] | None = None
    if mode == "exact":
        resize = (out_h, out_w)
    elif mode == "exact+crop":
        resize = (out_h + draw(st.integers(0, 5)), out_w + draw(st.integers(0, 5)))
        crop = (out_h, out_w)
    elif mode == "shorter":
        shorter = max(out_h, out_w) + draw(st.integers(0, 5))
        crop = (out_h, out_w)
    elif mode == "crop":
        crop = (out_h, out_w)
    coef = st.floats(-4.0, 4.0, allow_nan=False)
    positive = st.floats(0.01, 100.0, allow_nan=False)
    per_channel = draw(st.booleans())
    n = channels if per_channel else 1
    pre = ImagePreprocess(
        input="image", resize=resize, resize_shorter=shorter, crop=crop,
        scale=tuple(draw(st.lists(coef, min_size=n, max_size=n))),
        mean=tuple(draw(st.lists(coef, min_size=n, max_size=n))),
        std=tuple(draw(st.lists(positive, min_size=n, max_size=n))),
        layout=layout, threads=draw(st.integers(1, 3)),
    )
    tensor = model_input(pre, channels, out_h, out_w, draw(st.sampled_from(OUTPUT_TYPES)))
    pre.check("m", tensor)
    # Request image sizes: fixed when nothing resizes or crops, else anything that can work.
    sizes = []
    for _ in range(draw(st.integers(0, 4))):
        count = draw(st.integers(0, 3))
        if mode in ("none", "exact+crop") and resize is None:
            h, w = out_h, out_w
        elif mode == "crop":
            h, w = out_h + draw(st.integers(0, 6)), out_w + draw(st.integers(0, 6))
        else:
            h, w = draw(st.integers(1, 30)), draw(st.integers(1, 30))
        sizes.append((count, h, w))
    return pre, tensor, sizes


@settings(max_examples=400, deadline=None)
@given(case=pipelines(), forms=st.lists(st.sampled_from(["array", "strided", "misaligned"]),
                                        min_size=4, max_size=4),
       seed=st.integers(0, 2**32 - 1))
def test_native_matches_oracle(
    case: tuple[ImagePreprocess, TensorSpec, list[tuple[int, int, int]]], forms: list[str],
    seed: int,
) -> None:
    pre, tensor, sizes = case
    rng = np.random.default_rng(seed)
    channels = pre.geometry(tensor)[0]
    images = [rng.integers(0, 256, (n, h, w, channels), dtype=np.uint8) for n, h, w in sizes]
    handed: list[Any] = []
    for image, form in zip(images, forms, strict=False):
        if form == "strided":
            wide = np.zeros((image.shape[0], image.shape[1], image.shape[2] * 2, channels),
                            np.uint8)
            wide[:, :, ::2] = image
            handed.append(wide[:, :, ::2])
        elif form == "misaligned":
            raw = bytearray(image.nbytes + 1)
            view = np.frombuffer(memoryview(raw)[1:], np.uint8).reshape(image.shape)
            view[...] = image
            handed.append(view)
        else:
            handed.append(image)
    got = run_native(pre, tensor, handed)
    want = preprocess_batch(images, pre, tensor)
    assert_same_bits(got, want)


@pytest.mark.parametrize("layout", ["NCHW", "NHWC"])
@pytest.mark.parametrize("datatype", OUTPUT_TYPES)
def test_imagenet_style_batch_large_enough_for_threads(layout: str, datatype: DataType) -> None:
    """A batch big enough to run without the GIL on several native threads."""
    pre = ImagePreprocess(input="image", resize_shorter=64, crop=(56, 56), scale=(1 / 255,),
                          mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225),
                          layout=layout, threads=3)
    tensor = model_input(pre, 3, 56, 56, datatype)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (5, 80, 100, 3), dtype=np.uint8),
              rng.integers(0, 256, (3, 120, 64, 3), dtype=np.uint8)]
    assert_same_bits(run_native(pre, tensor, images), preprocess_batch(images, pre, tensor))


def test_unbatched_single_image() -> None:
    pre = ImagePreprocess(input="image", resize=(9, 7), scale=(0.5,), mean=(1.0,))
    tensor = model_input(pre, 1, 9, 7)
    image = np.random.default_rng(2).integers(0, 256, (4, 5, 1), dtype=np.uint8)
    got = run_native(pre, tensor, [image], batched=False)
    assert_same_bits(got, preprocess_image(image, pre, tensor))
    with pytest.raises(ValueError, match="exactly one image"):
        native_preprocessor(pre, tensor).run([image, image], np.empty((1, 9, 7), np.float32),
                                             False)


def test_upscale_of_a_single_pixel_and_identity_resize() -> None:
    pre = ImagePreprocess(input="image", resize=(5, 5))
    tensor = model_input(pre, 3, 5, 5)
    pixel = np.array([[[10, 20, 30]]], dtype=np.uint8)
    got = run_native(pre, tensor, [pixel[None]])
    assert np.array_equal(got[0, :, 2, 2], [10, 20, 30]) and np.all(got[0, 0] == 10)
    same = np.random.default_rng(4).integers(0, 256, (1, 5, 5, 3), dtype=np.uint8)
    assert np.array_equal(run_native(pre, tensor, [same])[0], same[0].transpose(2, 0, 1))


def test_image_size_errors_name_the_image() -> None:
    crop = ImagePreprocess(input="image", crop=(4, 4))
    tensor = model_input(crop, 3, 4, 4)
    native = native_preprocessor(crop, tensor)
    ok = np.zeros((1, 4, 4, 3), np.uint8)
    small = np.zeros((1, 3, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"image 1: image of 3x8 pixels .* smaller than the 4x4"):
        native.run([ok, small], np.empty((2, 3, 4, 4), np.float32))
    exact = ImagePreprocess(input="image")
    native = native_preprocessor(exact, tensor)
    with pytest.raises(ValueError, match="must be 4x4"):
        native.run([np.zeros((1, 5, 4, 3), np.uint8)], np.empty((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected \[n, H, W, 3\]"):
        native.run([np.zeros((1, 4, 4, 1), np.uint8)], np.empty((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="hold 1 rows; out has 2"):
        native.run([ok], np.empty((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="more than out's 1"):
        native.run([ok, ok], np.empty((1, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected \[N, 3, 4, 4\]"):
        native.run([ok], np.empty((1, 4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="4-byte"):
        native.run([ok], np.empty((1, 3, 4, 4), np.float64))
    with pytest.raises(TypeError, match="Cannot cast"):
        native.run([ok.astype(np.float32)], np.empty((1, 3, 4, 4), np.float32))
    native.run([], np.empty((0, 3, 4, 4), np.float32))  # an empty batch is no work


def test_constructor_validates() -> None:
    make = _native.ImagePreprocessor
    with pytest.raises(ValueError, match=r"channels must be 1\.\.4"):
        make(5, 2, 2, a=[1.0] * 5, b=[0.0] * 5)
    with pytest.raises(ValueError, match="one coefficient per channel"):
        make(3, 2, 2, a=[1.0], b=[0.0])
    with pytest.raises(ValueError, match="resize must be"):
        make(1, 2, 2, resize="cubic", a=[1.0], b=[0.0])
    with pytest.raises(ValueError, match="positive size"):
        make(1, 2, 2, resize="exact", a=[1.0], b=[0.0])
    with pytest.raises(ValueError, match="layout"):
        make(1, 2, 2, layout="CHW", a=[1.0], b=[0.0])
    with pytest.raises(ValueError, match="output must be"):
        make(1, 2, 2, output="INT8", a=[1.0], b=[0.0])
    assert make(1, 2, 2, a=[1.0], b=[0.0], threads=0).threads == 1
    assert _native.hardware_threads() >= 1


# -- element conversions -------------------------------------------------------------------


@settings(max_examples=500, deadline=None)
@given(a=st.floats(width=32, allow_nan=False), b=st.floats(width=32, allow_nan=False),
       datatype=st.sampled_from(OUTPUT_TYPES))
def test_conversions_match_numpy_rounding(a: float, b: float, datatype: DataType) -> None:
    """x * a + b over every uint8 value, converted to each output type: covers float16
    subnormals, overflow to infinity and round-to-nearest-even ties."""
    native = _native.ImagePreprocessor(1, 16, 16, output=datatype.wire, a=[a], b=[b])
    image = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    out = np.empty((1, 1, 16, 16), datatype.numpy_dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        native.run([image], out)
        v = image[0, :, :, 0].astype(np.float32) * np.float32(a) + np.float32(b)
        want = cast_output(v, datatype)
    assert_same_bits(out[0, 0], want)


def test_half_and_bfloat16_edge_values() -> None:
    values = np.array([0.0, -0.0, 1.0, 65504.0, 65519.996, 65520.0, 1e-8, 2.98e-8, 6.1e-5,
                       5.96e-8, -5.96e-8, np.inf, -np.inf, 3.0e38, 1.00390625, 1.01171875],
                      dtype=np.float32)
    for datatype in (DataType.FP16, DataType.BF16):
        out = np.empty((1, 1, 1, len(values)), datatype.numpy_dtype)
        # One channel, x * a + b with x = 0: b is the value itself.
        for i, v in enumerate(values):
            one = np.empty((1, 1, 1, 1), datatype.numpy_dtype)
            _native.ImagePreprocessor(1, 1, 1, output=datatype.wire, a=[1.0], b=[float(v)]).run(
                [np.zeros((1, 1, 1, 1), np.uint8)], one)
            out[0, 0, 0, i] = one[0, 0, 0, 0]
        with np.errstate(over="ignore"):
            # 0 * 1 + b: the kernel's arithmetic (turns -0.0 into +0.0).
            want = cast_output(np.float32(0.0) * np.float32(1.0) + values, datatype)
        assert_same_bits(out[0, 0, 0], want)
    assert to_bfloat16_bits(np.array([np.nan], np.float32))[0] & 0x7FC0 == 0x7FC0


def test_axis_taps_half_pixel_centres() -> None:
    i0, i1, f = axis_taps(4, 8, 0, 8)  # 2x upscale
    assert i0.tolist() == [0, 0, 0, 1, 1, 2, 2, 3]
    assert i1.tolist() == [1, 1, 1, 2, 2, 3, 3, 3]  # i1 at d = 0 has weight 0
    assert f.tolist() == [0.0, 0.25, 0.75, 0.25, 0.75, 0.25, 0.75, 0.0]
    i0, i1, f = axis_taps(8, 4, 1, 2)  # 2x downscale, crop offset 1
    assert i0.tolist() == [2, 4] and i1.tolist() == [3, 5] and f.tolist() == [0.5, 0.5]


@settings(max_examples=300, deadline=None)
@given(case=pipelines(), data=st.data(), extra_rows=st.sampled_from([0, 0, 0, -1, 1]),
       seed=st.integers(0, 2**32 - 1))
def test_images_of_any_shape_match_oracle_or_refuse(
    case: tuple[ImagePreprocess, TensorSpec, list[tuple[int, int, int]]],
    data: st.DataObject, extra_rows: int, seed: int,
) -> None:
    """Client images of any rank, size (empty too) and channel count, and an output with a
    row too many or too few: the kernel refuses with ValueError or writes what the oracle
    computes."""
    pre, tensor, _ = case
    rng = np.random.default_rng(seed)
    channels = pre.geometry(tensor)[0]
    size = st.integers(0, 40)
    batch = st.tuples(st.integers(0, 2), size, size, st.just(channels))
    anything = st.lists(size, min_size=2, max_size=5).map(tuple)
    shapes: list[tuple[int, ...]] = data.draw(st.lists(batch | anything, max_size=3))
    images = [rng.integers(0, 256, s, dtype=np.uint8) for s in shapes]
    usable = all(len(s) == 4 and s[3] == channels and s[1] > 0 and s[2] > 0
                 and pre.image_problem(s[1], s[2], tensor) is None for s in shapes)
    rows = sum(s[0] for s in shapes)
    out_rows = max(0, rows + extra_rows)
    out = np.full((out_rows, *tensor.dims), 7, dtype=tensor.datatype.numpy_dtype)
    native = native_preprocessor(pre, tensor)
    if usable and out_rows == rows:
        native.run(images, out, True)
        assert_same_bits(out, preprocess_batch(images, pre, tensor))
    else:
        with pytest.raises(ValueError):
            native.run(images, out, True)
