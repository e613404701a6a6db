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
from collections.abc import Mapping

from server.errors import ModelLoadError
from server.spec import ImagePreprocess

PREFIX = "preprocess."
KEYS = frozenset(
    PREFIX + key
    for key in ("input", "resize", "crop", "scale", "mean", "std", "layout", "threads")
)
#: Largest resize / crop side accepted (a guard against typos, not a kernel limit).
MAX_SIDE = 16384
#: Most native threads one model may use per batch.
MAX_THREADS = 64


def default_threads() -> int:
    """Threads when the config does not say: the machine's cores, at most 4."""
    return max(1, min(4, os.cpu_count() or 1))


def parse_preprocess(parameters: Mapping[str, str], model: str) -> ImagePreprocess | None:
    """The model's preprocessing, or None when no ``preprocess.*`` key is set."""
    given = {k: v for k, v in parameters.items() if k.startswith(PREFIX)}
    if not given:
        return None
    where = f"model '{model}' parameter"
    unknown = sorted(set(given) - KEYS)
    if unknown:
        raise ModelLoadError(
            f"{where} '{unknown[0]}' is not a preprocessing key; known: {sorted(KEYS)}"
        )
    target = given.get(PREFIX + "input", "").strip()
    if not target:
        raise ModelLoadError(
            f"{where}s {sorted(given)} need 'preprocess.input', the model input they feed"
        )

    resize: tuple[int, int] | None = None
    shorter: int | None = None
    raw_resize = given.get(PREFIX + "resize", "").strip()
    if raw_resize:
        sizes = _ints(raw_resize, f"{where} 'preprocess.resize'", (1, 2))
        if len(sizes) == 1:
            shorter = sizes[0]
        else:
            resize = (sizes[0], sizes[1])
    crop: tuple[int, int] | None = None
    raw_crop = given.get(PREFIX + "crop", "").strip()
    if raw_crop:
        h, w = _ints(raw_crop, f"{where} 'preprocess.crop'", (2,))
        crop = (h, w)

    layout = given.get(PREFIX + "layout", "NCHW").strip().upper() or "NCHW"
    if layout not in ("NCHW", "NHWC"):
        raise ModelLoadError(f"{where} 'preprocess.layout' must be NCHW or NHWC, got '{layout}'")

    scale = _floats(given, "scale", 1.0, where)
    mean = _floats(given, "mean", 0.0, where)
    std = _floats(given, "std", 1.0, where)
    if any(s == 0.0 for s in std):
        raise ModelLoadError(f"{where} 'preprocess.std' must not contain 0")

    threads = default_threads()
    raw_threads = given.get(PREFIX + "threads", "").strip()
    if raw_threads:
        try:
            threads = int(raw_threads)
        except ValueError:
            threads = 0
        if not 1 <= threads <= MAX_THREADS:
            raise ModelLoadError(
                f"{where} 'preprocess.threads' must be an integer in 1..{MAX_THREADS}, "
                f"got '{raw_threads}'"
            )
    return ImagePreprocess(
        input=target, resize=resize, resize_shorter=shorter, crop=crop, scale=scale, mean=mean,
        std=std, layout=layout, threads=threads,
    )


def _ints(text: str, where: str, counts: tuple[int, ...]) -> list[int]:
    try:
        values = [int(part) for part in text.replace("x", ",").split(",")]
    except ValueError:
        values = []
    if len(values) not in counts or any(not 1 <= v <= MAX_SIDE for v in values):
        form = " or ".join({1: '"S" (shorter side)', 2: '"H,W"'}[c] for c in counts)
        raise ModelLoadError(f"{where} must be {form} with sizes in 1..{MAX_SIDE}, got '{text}'")
    return values


def _floats(given: Mapping[str, str], key: str, default: float, where: str) -> tuple[float, ...]:
    text = given.get(PREFIX + key, "").strip()
    if not text:
        return (default,)
    try:
        values = tuple(float(part) for part in text.split(","))
    except ValueError:
        raise ModelLoadError(
            f"{where} 'preprocess.{key}' must be comma-separated numbers, got '{text}'"
        ) from None
    if not all(math.isfinite(v) for v in values):
        raise ModelLoadError(f"{where} 'preprocess.{key}' must be finite, got '{text}'")
    return values
