"""The plain numpy image preprocessing: the oracle for csrc/preprocess.hpp.

Same operations, in the same order, in the same precision as the native kernel: source
coordinates in float64, interpolation and normalisation in float32, then one cast. The
native kernel is compiled without FMA contraction (setup.py), so the two agree bit for bit;
the tests allow no tolerance for the unresized path and document the one they allow for
bilinear resizing (see tests/unit/preprocess/).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from server.spec import ImagePreprocess, TensorSpec
from server.types import Array, DataType


def axis_taps(in_size: int, resized: int, offset: int, out: int) -> tuple[Array, Array, Array]:
    """(i0, i1, f) for ``out`` output positions from ``offset`` of a ``resized``-long axis
    resampled from ``in_size`` source pixels (half-pixel centres, clamped at the edges)."""
    d = np.arange(offset, offset + out, dtype=np.float64)
    src = np.maximum((d + 0.5) * (in_size / resized) - 0.5, 0.0)
    fl = np.floor(src)
    i0 = fl.astype(np.intp)
    last = in_size - 1
    edge = i0 >= last
    f = (src - fl).astype(np.float32)
    i1 = np.where(edge, last, i0 + 1)
    i0 = np.where(edge, last, i0)
    f = np.where(edge, np.float32(0.0), f).astype(np.float32)
    return i0, i1, f


def to_bfloat16_bits(values: Array) -> Array:
    """float32 -> bfloat16 words (uint16), round to nearest even; NaN stays a quiet NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = (bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)
    nan = (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000)
    quiet = (bits >> np.uint32(16)) | np.uint32(0x0040)
    return np.where(nan, quiet, rounded).astype(np.uint16)


def cast_output(values: Array, datatype: DataType) -> Array:
    """float32 results -> the model input's datatype (BF16 as uint16 words)."""
    if datatype is DataType.FP32:
        return values
    if datatype is DataType.FP16:
        with np.errstate(over="ignore"):  # beyond 65504 rounds to inf, as the kernel does
            return values.astype(np.float16)
    if datatype is DataType.BF16:
        return to_bfloat16_bits(values)
    if datatype is DataType.FP64:
        return values.astype(np.float64)
    raise ValueError(f"preprocessing does not produce {datatype.wire}")


def preprocess_image(image: Array, pre: ImagePreprocess, model_input: TensorSpec) -> Array:
    """One uint8 [H, W, C] image -> the model input's [C, OH, OW] (or [OH, OW, C]) tensor."""
    channels, out_h, out_w = pre.geometry(model_input)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != channels:
        raise ValueError(
            f"image has dtype {image.dtype} and shape {list(image.shape)}; expected uint8 "
            f"[H, W, {channels}]"
        )
    height, width = int(image.shape[0]), int(image.shape[1])
    problem = pre.image_problem(height, width, model_input)
    if problem is not None:
        raise ValueError(problem)
    rh, rw = pre.resized_size(height, width)
    top = (rh - out_h) // 2 if pre.crop is not None else 0
    left = (rw - out_w) // 2 if pre.crop is not None else 0
    pixels = image.astype(np.float32)
    if (rh, rw) == (height, width):
        v = pixels[top:top + out_h, left:left + out_w]
    else:
        y0, y1, fy = axis_taps(height, rh, top, out_h)
        x0, x1, fx = axis_taps(width, rw, left, out_w)
        r0 = pixels[y0]
        r1 = pixels[y1]
        p00, p01 = r0[:, x0], r0[:, x1]
        p10, p11 = r1[:, x0], r1[:, x1]
        fxb = fx[None, :, None]
        fyb = fy[:, None, None]
        top_row = p00 + fxb * (p01 - p00)
        bottom_row = p10 + fxb * (p11 - p10)
        v = top_row + fyb * (bottom_row - top_row)
    a, b = pre.coefficients(channels)
    out = v * np.asarray(a, dtype=np.float32) + np.asarray(b, dtype=np.float32)
    if pre.layout == "NCHW":
        out = out.transpose(2, 0, 1)
    return np.ascontiguousarray(cast_output(out, model_input.datatype))


def preprocess_batch(
    images: Sequence[Array], pre: ImagePreprocess, model_input: TensorSpec
) -> Array:
    """Requests' uint8 [n, H, W, C] images -> one [N, ...] batch of the model input."""
    per_image = [
        preprocess_image(one, pre, model_input) for request in images for one in request
    ]
    channels, out_h, out_w = pre.geometry(model_input)
    shape = (channels, out_h, out_w) if pre.layout == "NCHW" else (out_h, out_w, channels)
    dtype = model_input.datatype.numpy_dtype
    if not per_image:
        return np.empty((0, *shape), dtype=dtype)
    return np.stack(per_image)
