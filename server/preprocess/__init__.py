"""Image preprocessing declared per model (config ``preprocess.*``): uint8 HWC images ->
the model's normalised float input, fused with packing.

The native kernels live in csrc/preprocess.hpp (bound as ``server._native.ImagePreprocessor``);
``reference`` is their numpy oracle; ``config`` parses and checks the config keys.
"""

from __future__ import annotations

from server import _native
from server.spec import ImagePreprocess, TensorSpec


def native_preprocessor(pre: ImagePreprocess, model_input: TensorSpec) -> _native.ImagePreprocessor:
    """The compiled pipeline for one model input (built once per model version)."""
    channels, out_h, out_w = pre.geometry(model_input)
    a, b = pre.coefficients(channels)
    if pre.resize is not None:
        mode, rh, rw, shorter = "exact", pre.resize[0], pre.resize[1], 0
    elif pre.resize_shorter is not None:
        mode, rh, rw, shorter = "shorter", 0, 0, pre.resize_shorter
    else:
        mode, rh, rw, shorter = "none", 0, 0, 0
    return _native.ImagePreprocessor(
        channels, out_h, out_w, resize=mode, resize_h=rh, resize_w=rw, shorter=shorter,
        crop=pre.crop is not None, layout=pre.layout, output=model_input.datatype.wire,
        a=list(a), b=list(b), threads=pre.threads,
    )


__all__ = ["native_preprocessor"]
