"""Micro-benchmark: native image preprocessing vs the best numpy we could write, and vs memory
bandwidth for the bytes the preprocessing touches.

Run from anywhere, after building the extension (``python setup.py build_ext --inplace``):

    python bench/micro/preprocess.py [--repeat 15] [--min-time 0.2]

Headline case: a batch of 32 uint8 224x224x3 images -> float32 NCHW with
per-channel mean/std (no resize): the batch buffer is written once. The native kernel gets the
images as 32 separate request arrays (as the server has them); numpy gets them pre-stacked
in one array (its most favourable form). Several numpy formulations are timed and the fastest
is the baseline. The native kernel runs with 1 and with 2 threads (this machine has 2 cores).

Bandwidth: a large ``np.copyto`` (512 MiB, far past the caches) measures the memory bandwidth
of one core as (bytes read + bytes written) / time; the preprocessing's bound is then
(uint8 bytes read + float32 bytes written) / that bandwidth. A copy as large as the bytes the
preprocessing touches (which fit the 32 MiB L3 here) is reported beside it.

Secondary case: the same batch from 288x384 images, resized (bilinear, shorter side 256) and
centre-cropped to 224x224 — numpy's best is the oracle's gather-and-lerp, vectorised over
the batch.

Writes bench/results/micro_preprocess.json and micro_preprocess.png (medians of repeats).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.micro._report import (  # noqa: E402
    bar_chart,
    machine,
    paired,
    timings,
    write_json,
)
from bench.results_md import RESULTS_DIR  # noqa: E402

BATCH, H, W, C = 32, 224, 224, 3
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
SCALE = 1 / 255
TARGET_SPEEDUP = 2.0
TARGET_BANDWIDTH_RATIO = 2.0


def coefficients() -> tuple[Any, Any]:
    from server.spec import ImagePreprocess

    a, b = ImagePreprocess("image", scale=(SCALE,), mean=MEAN, std=STD).coefficients(C)
    return np.asarray(a, np.float32), np.asarray(b, np.float32)


def numpy_variants(a: Any, b: Any) -> dict[str, Callable[[Any, Any], Any]]:
    """Ways to write uint8 NHWC -> (x * a + b) float32 NCHW in numpy; all bit-identical."""
    a4 = a[:, None, None]
    b4 = b[:, None, None]
    luts = [np.arange(256, dtype=np.float32) * a[c] + b[c] for c in range(C)]

    def astype_then_transpose(x: Any, out: Any) -> Any:
        return np.ascontiguousarray((x.astype(np.float32) * a + b).transpose(0, 3, 1, 2))

    def ufuncs_into_nchw(x: Any, out: Any) -> Any:
        np.multiply(x.transpose(0, 3, 1, 2), a4, out=out, casting="unsafe")
        np.add(out, b4, out=out)
        return out

    def per_channel_ufuncs(x: Any, out: Any) -> Any:
        for c in range(C):
            np.multiply(x[..., c], a[c], out=out[:, c], casting="unsafe")
            np.add(out[:, c], b[c], out=out[:, c])
        return out

    def per_channel_lookup(x: Any, out: Any) -> Any:
        for c in range(C):
            out[:, c] = luts[c][x[..., c]]
        return out

    def per_channel_take(x: Any, out: Any) -> Any:
        for c in range(C):
            np.take(luts[c], x[..., c], out=out[:, c], mode="clip")
        return out

    return {
        "astype*a+b, transpose": astype_then_transpose,
        "ufuncs into NCHW": ufuncs_into_nchw,
        "per-channel ufuncs": per_channel_ufuncs,
        "per-channel LUT index": per_channel_lookup,
        "per-channel LUT take": per_channel_take,
    }


def numpy_resize_crop(x: Any, a: Any, b: Any, out: Any) -> Any:
    """The oracle's bilinear resize + crop + normalise, vectorised over the batch."""
    from server.preprocess.reference import axis_taps

    _, h, w, _ = x.shape
    rh, rw = (256, w * 256 // h) if h <= w else (h * 256 // w, 256)
    top, left = (rh - H) // 2, (rw - W) // 2
    y0, y1, fy = axis_taps(h, rh, top, H)
    x0, x1, fx = axis_taps(w, rw, left, W)
    pixels = x.astype(np.float32)
    r0, r1 = pixels[:, y0], pixels[:, y1]
    fxb, fyb = fx[None, None, :, None], fy[None, :, None, None]
    top_row = r0[:, :, x0] + fxb * (r0[:, :, x1] - r0[:, :, x0])
    bottom_row = r1[:, :, x0] + fxb * (r1[:, :, x1] - r1[:, :, x0])
    v = top_row + fyb * (bottom_row - top_row)
    np.copyto(out, (v * a + b).transpose(0, 3, 1, 2))
    return out


def native_preprocessor(threads: int, resize: bool) -> Any:
    from server.preprocess import native_preprocessor as build
    from server.spec import ImagePreprocess, TensorSpec
    from server.types import DataType

    pre = ImagePreprocess("image", resize_shorter=256 if resize else None,
                          crop=(H, W) if resize else None, scale=(SCALE,), mean=MEAN, std=STD,
                          threads=threads)
    return build(pre, TensorSpec("image", DataType.FP32, (C, H, W)))


def bandwidth(nbytes: int, repeat: int, min_time: float) -> dict[str, float]:
    src = np.ones(nbytes, dtype=np.uint8)
    dst = np.empty_like(src)
    t = timings(lambda: np.copyto(dst, src), repeat, min_time)
    return {"copy_bytes": nbytes, "median_s": t["median_s"],
            "gb_per_s": 2 * nbytes / t["median_s"] / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per case (median)")
    parser.add_argument("--min-time", type=float, default=0.2, help="seconds per timed run")
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "micro_preprocess.json")
    args = parser.parse_args(argv)
    rng = np.random.default_rng(0)
    a, b = coefficients()

    # -- headline: normalise + NHWC -> NCHW, no resize ----------------------------------------
    images = [rng.integers(0, 256, (1, H, W, C), dtype=np.uint8) for _ in range(BATCH)]
    stacked = np.concatenate(images)
    out = np.empty((BATCH, C, H, W), np.float32)
    want = (stacked.astype(np.float32) * a + b).transpose(0, 3, 1, 2)
    contenders: dict[str, Callable[[], object]] = {}
    for name, fn in numpy_variants(a, b).items():
        assert fn(stacked, out).tobytes() == np.ascontiguousarray(want).tobytes(), name
        contenders[name] = lambda fn=fn: fn(stacked, out)
    for threads in (1, 2):
        kernel = native_preprocessor(threads, resize=False)
        out[...] = 0
        kernel.run(images, out)
        assert out.tobytes() == np.ascontiguousarray(want).tobytes()
        contenders[f"native {threads}"] = lambda k=kernel: k.run(images, out)
    measured = paired(contenders, args.repeat, args.min_time)
    numpy_times = {k: v["median_s"] for k, v in measured.items() if not k.startswith("native")}
    native_times = {t: measured[f"native {t}"]["median_s"] for t in (1, 2)}
    best_numpy = min(numpy_times, key=lambda k: numpy_times[k])

    touched = stacked.nbytes + out.nbytes
    dram = bandwidth(512 * 2**20, max(5, args.repeat // 3), args.min_time)
    same_size = bandwidth(touched // 2, args.repeat, args.min_time)
    bound_s = touched / (dram["gb_per_s"] * 1e9)
    best_native = min(native_times.values())
    speedup = numpy_times[best_numpy] / best_native
    ratio = best_native / bound_s

    # -- secondary: bilinear resize (shorter side 256) + centre crop 224 ----------------------
    big = rng.integers(0, 256, (BATCH, 288, 384, C), dtype=np.uint8)
    big_requests = [big[i:i + 1] for i in range(BATCH)]
    resize_want = numpy_resize_crop(big, a, b, out).tobytes()
    resize_contenders: dict[str, Callable[[], object]] = {
        "numpy": lambda: numpy_resize_crop(big, a, b, out)}
    for threads in (1, 2):
        kernel = native_preprocessor(threads, resize=True)
        out[...] = 0
        kernel.run(big_requests, out)
        assert out.tobytes() == resize_want
        resize_contenders[f"native {threads}"] = lambda k=kernel: k.run(big_requests, out)
    resized = paired(resize_contenders, max(5, args.repeat // 2), args.min_time)
    numpy_resize_s = resized["numpy"]["median_s"]
    resize_times = {t: resized[f"native {t}"]["median_s"] for t in (1, 2)}

    report = {
        "benchmark": "micro_preprocess",
        **machine(),
        "command": "python bench/micro/preprocess.py " + " ".join(argv or sys.argv[1:]),
        "repeat": args.repeat,
        "min_time_s": args.min_time,
        "statistic": "median seconds per call over repeats",
        "case": f"{BATCH} x {H}x{W}x{C} uint8 -> float32 NCHW, (x/255 - mean) / std",
        "numpy_variants_ms": {k: v * 1e3 for k, v in numpy_times.items()},
        "best_numpy": best_numpy,
        "native_ms": {f"{k} thread{'s' if k > 1 else ''}": v * 1e3
                      for k, v in native_times.items()},
        "speedup_vs_best_numpy": speedup,
        "bytes_touched": touched,
        "memcpy_512MiB": dram,
        "memcpy_same_bytes": same_size,
        "bandwidth_bound_ms": bound_s * 1e3,
        "native_over_bandwidth_bound": ratio,
        "targets": {
            f"speedup >= {TARGET_SPEEDUP}x best numpy": speedup >= TARGET_SPEEDUP,
            f"within {TARGET_BANDWIDTH_RATIO}x of memory bandwidth":
                ratio <= TARGET_BANDWIDTH_RATIO,
        },
        "resize_case": {
            "case": f"{BATCH} x 288x384x3 uint8 -> shorter side 256 (bilinear) -> centre "
                    f"crop {H}x{W} -> float32 NCHW normalised",
            "numpy_ms": numpy_resize_s * 1e3,
            "native_ms": {f"{k} thread{'s' if k > 1 else ''}": v * 1e3
                          for k, v in resize_times.items()},
            "speedup": numpy_resize_s / min(resize_times.values()),
        },
    }
    write_json(args.output, report)

    print(f"case: {report['case']}")
    for name, t in numpy_times.items():
        mark = "  <- best numpy" if name == best_numpy else ""
        print(f"  numpy  {name:<28}{t * 1e3:9.2f} ms{mark}")
    for threads, t in native_times.items():
        print(f"  native {threads} thread(s){'':<17}{t * 1e3:9.2f} ms")
    print(f"  speedup vs best numpy: {speedup:.2f}x (target {TARGET_SPEEDUP}x)")
    print(f"  memcpy 512 MiB: {dram['gb_per_s']:.1f} GB/s (read + write); same-size copy "
          f"({touched // 2 / 1e6:.1f} MB): {same_size['gb_per_s']:.1f} GB/s")
    print(f"  bytes touched {touched / 1e6:.1f} MB -> bandwidth bound {bound_s * 1e3:.2f} ms; "
          f"native / bound = {ratio:.2f} (target <= {TARGET_BANDWIDTH_RATIO})")
    print(f"resize case: numpy {numpy_resize_s * 1e3:.1f} ms, native "
          + ", ".join(f"{k}T {v * 1e3:.1f} ms" for k, v in resize_times.items())
          + f" -> {report['resize_case']['speedup']:.1f}x")

    groups = ["normalise + NCHW\n(224x224, no resize)", "resize 288x384 -> 256\n+ crop 224"]
    bar_chart(
        args.output.with_suffix(".png"),
        f"Preprocessing {BATCH} images: numpy vs native (median of {args.repeat})\n"
        f"{report['cpu']}, {report['cpu_count']} CPUs, rev {report['git_revision']}",
        groups,
        {
            f"numpy (best: {best_numpy})": [numpy_times[best_numpy] * 1e3, numpy_resize_s * 1e3],
            "native 1 thread": [native_times[1] * 1e3, resize_times[1] * 1e3],
            "native 2 threads": [native_times[2] * 1e3, resize_times[2] * 1e3],
            "memory-bandwidth bound": [bound_s * 1e3, None],
        },
        "milliseconds per batch (log)",
        notes=[f"memcpy {dram['gb_per_s']:.1f} GB/s (512 MiB, read+write); "
               f"{touched / 1e6:.1f} MB touched; native/bound {ratio:.2f}; "
               f"speedup vs best numpy {speedup:.2f}x"],
    )
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
