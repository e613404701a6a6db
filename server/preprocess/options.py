"""config.pbtxt ``parameters`` -> ImagePreprocess: the ``preprocess.*`` keys, checked at load.

::

    parameters [
      { key: "preprocess.input"  value { string_value: "image" } },
      { key: "preprocess.resize" value { string_value: "36" } },      # shorter side; or "H,W"
      { key: "preprocess.crop"   value { string_value: "32,32" } },   # centre crop = model H,W
      { key: "preprocess.scale"  value { string_value: "0.00392156862745098" } },
      { key: "preprocess.mean"   value { string_value: "0.485,0.456,0.406" } },
      { key: "preprocess.std"    value { string_value: "0.229,0.224,0.225" } },
      { key: "preprocess.layout" value { string_value: "NCHW" } },
      { key: "preprocess.threads" value { string_value: "2" } }
    ]

Only ``preprocess.input`` is required. Checks that need the model input (its datatype, dims,
channel count) run when the ModelSpec is built with its inputs (ImagePreprocess.check).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping

from server.errors import ModelLoadError
from server.parameters import Key, choice, integer, optional, text
from server.spec import ImagePreprocess

PREFIX = "preprocess."
#: Largest resize / crop side accepted (a guard against typos, not a kernel limit).
MAX_SIDE = 16384
#: Most native threads one model may use per batch.
MAX_THREADS = 64


def default_threads() -> int:
    """Threads when the config does not say: the machine's cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def _sizes(*counts: int) -> Callable[[str], tuple[int, ...]]:
    form = " or ".join({1: '"S" (shorter side)', 2: '"H,W"'}[c] for c in counts)
    expected = f"{form} with sizes in 1..{MAX_SIDE}"

    def parse(value: str) -> tuple[int, ...]:
        try:
            sizes = tuple(int(part) for part in value.replace("x", ",").split(","))
        except ValueError:
            raise ValueError(expected) from None
        if len(sizes) not in counts or any(not 1 <= v <= MAX_SIDE for v in sizes):
            raise ValueError(expected)
        return sizes

    return parse


def _floats(value: str) -> tuple[float, ...]:
    expected = "comma-separated finite numbers"
    try:
        values = tuple(float(part) for part in value.split(","))
    except ValueError:
        raise ValueError(expected) from None
    if not all(math.isfinite(v) for v in values):
        raise ValueError(expected)
    return values


def _divisors(value: str) -> tuple[float, ...]:
    values = _floats(value)
    if 0.0 in values:
        raise ValueError("comma-separated finite numbers, none of them 0")
    return values


INPUT = Key(PREFIX + "input", optional(text),
            "the model input the image preprocessing feeds; required by the other keys")
RESIZE = Key(PREFIX + "resize", optional(_sizes(1, 2)),
             "resize to this shorter side \"S\" or to \"H,W\" (default: no resize)")
CROP = Key(PREFIX + "crop", optional(_sizes(2)), "centre crop \"H,W\" (default: no crop)")
SCALE = Key(PREFIX + "scale", _floats, "pixel values are multiplied by this, per channel", "1")
MEAN = Key(PREFIX + "mean", _floats, "then this is subtracted, per channel", "0")
STD = Key(PREFIX + "std", _divisors, "then divided by this, per channel", "1")
LAYOUT = Key(PREFIX + "layout", choice("NCHW", "NHWC"), "the model input's layout", "NCHW")
THREADS = Key(PREFIX + "threads", optional(integer(1, MAX_THREADS)),
              "native threads per batch (default: the cores, at most 4)")
#: config.pbtxt ``parameters`` keys image preprocessing owns.
PARAMETER_KEYS = (INPUT, RESIZE, CROP, SCALE, MEAN, STD, LAYOUT, THREADS)


def parse_preprocess(parameters: Mapping[str, str], model: str) -> ImagePreprocess | None:
    """The model's preprocessing, or None when no ``preprocess.*`` key is set."""
    given = sorted(k for k in parameters if k.startswith(PREFIX))
    if not given:
        return None
    target = INPUT.value(parameters, model)
    if not target:
        raise ModelLoadError(f"model '{model}' parameters {given} need '{INPUT.name}', the "
                             "model input they feed")
    resize = RESIZE.value(parameters, model)
    crop = CROP.value(parameters, model)
    threads = THREADS.value(parameters, model)
    return ImagePreprocess(
        input=target,
        resize=(resize[0], resize[1]) if resize is not None and len(resize) == 2 else None,
        resize_shorter=resize[0] if resize is not None and len(resize) == 1 else None,
        crop=(crop[0], crop[1]) if crop is not None else None,
        scale=SCALE.value(parameters, model),
        mean=MEAN.value(parameters, model),
        std=STD.value(parameters, model),
        layout=LAYOUT.value(parameters, model),
        threads=default_threads() if threads is None else threads,
    )
