"""Micro-benchmark: native batch packing/unpacking (server._native) vs numpy, 64 requests.

Run from anywhere, after building the extension (``python setup.py build_ext --inplace``):

    python bench/micro/packing.py [--repeat 15] [--min-time 0.05] [--requests 64]

Cases (per request one row of the shape below, ``--requests`` requests per batch):

* pack from raw bytes — the headline figure: numpy makes a ``frombuffer`` view of each
  request's raw_input_contents and concatenates them; native copies straight from the
  bytes into a pooled batch buffer (``gather``, one memcpy per request);
* pack from views — both start from the decoded numpy views (what the server holds);
* unpack — numpy ``split`` + ``tobytes`` per request (the reference path plus the encoder)
  vs native ``scatter`` straight into ``bytes``;
* model packer — a whole batch through ``ModelPacker.pack`` + ``unpack`` + encoding the
  outputs, for an MLP-like model: NativeModelPacker vs ReferenceModelPacker.

Writes bench/results/micro_packing.json and micro_packing.png. Figures are medians of
``--repeat`` runs (the machine is shared; quartiles are in the JSON).
"""

from __future__ import annotations

import argparse
import sys
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

SHAPES = {
    "mlp 64 fp32 (256 B)": (64,),
    "cnn 3x32x32 fp32 (12 KiB)": (3, 32, 32),
    "image 3x224x224 fp32 (588 KiB)": (3, 224, 224),
}
TARGET_SPEEDUP = 3.0


def minor_faults(fn: Any, calls: int = 5) -> float:
    """Minor page faults per call: fresh memory (numpy's new batch, new bytes objects) is
    faulted in page by page, which is what bounds the large cases."""
    import resource

    fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
        fn()
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / calls


def bench_kernels(requests: int, repeat: int, min_time: float) -> list[dict[str, Any]]:
    from server import _native
    from server.packing.pool import BufferPool

    rows: list[dict[str, Any]] = []
    rng = np.random.default_rng(0)
    pool = BufferPool()
    for label, shape in SHAPES.items():
        dtype = np.dtype(np.float32)
        raws = [rng.standard_normal((1, *shape)).astype(dtype).tobytes() for _ in range(requests)]
        views = [np.frombuffer(r, dtype=dtype).reshape(1, *shape) for r in raws]
        batch_shape = (requests, *shape)

        def numpy_from_raw(raws: list[bytes] = raws, shape: tuple[int, ...] = shape) -> Any:
            return np.concatenate([np.frombuffer(r, dtype=np.float32).reshape(1, *shape)
                                   for r in raws])

        def numpy_from_views(views: list[Any] = views) -> Any:
            return np.concatenate(views)

        def native(sources: list[Any], batch_shape: tuple[int, ...] = batch_shape,
                   dtype: np.dtype[Any] = dtype) -> None:
            buffer, out = pool.take("x", dtype, batch_shape)
            _native.gather(sources, out)
            pool.give("x", buffer)

        check = np.empty(batch_shape, dtype)
        _native.gather(raws, check)
        assert check.tobytes() == numpy_from_raw().tobytes() == numpy_from_views().tobytes()

        batch = numpy_from_views()
        counts = [1] * requests
        split_at = np.arange(1, requests)

        def numpy_unpack(batch: Any = batch, split_at: Any = split_at) -> Any:
            return [part.tobytes() for part in np.split(batch, split_at)]

        def native_unpack(batch: Any = batch, counts: list[int] = counts) -> Any:
            return _native.scatter(batch, counts)

        assert numpy_unpack() == native_unpack()
        nbytes = batch.nbytes
        # The floor for moving these bytes once: one memcpy into a warm, preallocated buffer.
        warm_dst = np.empty_like(batch)
        floor = timings(lambda batch=batch, dst=warm_dst: np.copyto(dst, batch), repeat,
                        min_time)["median_s"]
        for op, numpy_fn, native_fn in (
            ("pack from raw bytes", numpy_from_raw, lambda raws=raws: native(raws)),
            ("pack from views", numpy_from_views, lambda views=views: native(views)),
            ("unpack to bytes", numpy_unpack, native_unpack),
        ):
            both = paired({"numpy": numpy_fn, "native": native_fn}, repeat, min_time)
            n, c = both["numpy"], both["native"]
            rows.append({
                "op": op, "case": label, "requests": requests, "batch_bytes": nbytes,
                "numpy_us": n["median_s"] * 1e6, "native_us": c["median_s"] * 1e6,
                "speedup": n["median_s"] / c["median_s"],
                "native_gb_per_s": nbytes / c["median_s"] / 1e9,
                "memcpy_us": floor * 1e6,
                "native_over_memcpy": c["median_s"] / floor,
                "numpy_page_faults_per_call": minor_faults(numpy_fn),
                "native_page_faults_per_call": minor_faults(native_fn),
                "numpy_quartiles_us": [n["q1_s"] * 1e6, n["q3_s"] * 1e6],
                "native_quartiles_us": [c["q1_s"] * 1e6, c["q3_s"] * 1e6],
            })
    return rows


def bench_model_packers(requests: int, repeat: int, min_time: float) -> list[dict[str, Any]]:
    """A whole batch: pack, (no model), unpack, encode each request's outputs."""
    from server.codec.encode import raw_bytes
    from server.packing import NativePacker, ReferencePacker
    from server.spec import ModelSpec, TensorSpec
    from server.types import DataType, InferRequest

    spec = ModelSpec(
        name="mlp", platform="onnxruntime_onnx", backend="onnxruntime", max_batch_size=requests,
        inputs=(TensorSpec("input", DataType.FP32, (64,)),),
        outputs=(TensorSpec("label", DataType.INT64, (1,)),
                 TensorSpec("probabilities", DataType.FP32, (10,))),
    )
    rng = np.random.default_rng(1)
    reqs = [InferRequest(model_name="mlp", model_version="1", id=str(i), input_types={},
                         inputs={"input": np.frombuffer(
                             rng.standard_normal((1, 64)).astype(np.float32).tobytes(),
                             dtype=np.float32).reshape(1, 64)})
            for i in range(requests)]
    rows = [1] * requests
    outputs = {"label": rng.integers(0, 10, (requests, 1)),
               "probabilities": rng.random((requests, 10)).astype(np.float32)}
    batches: dict[str, Any] = {}
    encoded: dict[str, Any] = {}
    for name, factory in (("reference", ReferencePacker()), ("native", NativePacker())):
        packer = factory.for_model(spec, "1")

        def one_batch(packer: Any = packer) -> Any:
            with packer.pack(reqs, rows) as batch:
                assert batch["input"].shape == (requests, 64)
                per_request = packer.unpack(outputs, rows)
            return [[raw_bytes(t) for t in outs.values()] for outs in per_request]

        encoded[name] = one_batch()
        batches[name] = one_batch
    assert encoded["native"] == encoded["reference"]
    results = paired(batches, repeat, min_time)
    ref, nat = results["reference"]["median_s"], results["native"]["median_s"]
    return [{
        "op": "model packer: pack + unpack + encode", "case": "mlp (64 in, 1 + 10 out)",
        "requests": requests, "numpy_us": ref * 1e6, "native_us": nat * 1e6,
        "speedup": ref / nat, "per_request_saved_us": (ref - nat) / requests * 1e6,
    }]


#: glibc settings that keep freed large blocks in the heap instead of unmapping them.
MALLOC_TUNED = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30)}


def fault_probe(repeat: int) -> dict[str, float]:
    """Unpack of 64 x 588 KiB into fresh bytes: median ms and minor faults per call."""
    import resource
    import statistics
    import time

    from server import _native

    batch = np.random.default_rng(0).standard_normal((64, 3, 224, 224)).astype(np.float32)
    rows = [1] * 64
    _native.scatter(batch, rows)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        pieces = _native.scatter(batch, rows)
        times.append(time.perf_counter() - start)
        del pieces
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeat
    return {"median_ms": statistics.median(times) * 1e3, "faults_per_call": faults}


def fault_probes(repeat: int) -> dict[str, Any]:
    """The large unpack in a fresh process, with glibc's defaults and with MALLOC_TUNED."""
    import json
    import os
    import subprocess

    results: dict[str, Any] = {}
    for label, extra in (("glibc defaults", {}), ("malloc tuned", MALLOC_TUNED)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | extra
        out = subprocess.run([sys.executable, __file__, "--fault-probe", str(repeat)], env=env,
                             capture_output=True, text=True, check=True).stdout
        results[label] = {"env": extra, **json.loads(out)}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per case (median)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--output", type=Path, default=RESULTS_DIR / "micro_packing.json")
    parser.add_argument("--fault-probe", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.fault_probe:
        import json

        print(json.dumps(fault_probe(args.fault_probe)))
        return 0

    rows = bench_kernels(args.requests, args.repeat, args.min_time)
    rows += bench_model_packers(args.requests, args.repeat, args.min_time)
    print(f"{'op':<38}{'case':<32}{'numpy us':>10}{'native us':>10}{'speedup':>9}"
          f"{'memcpy us':>10}{'faults np/nat':>15}")
    for r in rows:
        extra = ""
        if "memcpy_us" in r:
            extra = (f"{r['memcpy_us']:>10.2f}{r['numpy_page_faults_per_call']:>8.0f}/"
                     f"{r['native_page_faults_per_call']:<6.0f}")
        print(f"{r['op']:<38}{r['case']:<32}{r['numpy_us']:>10.2f}{r['native_us']:>10.2f}"
              f"{r['speedup']:>8.1f}x{extra}")
    headline = [r for r in rows if r["op"] == "pack from raw bytes"]
    met = {r["case"]: r["speedup"] >= TARGET_SPEEDUP for r in headline}
    report = {
        "benchmark": "micro_packing",
        **machine(),
        "command": "python bench/micro/packing.py " + " ".join(argv or sys.argv[1:]),
        "repeat": args.repeat,
        "min_time_s": args.min_time,
        "statistic": "median seconds per call over repeats, in microseconds",
        "target": f"pack of {args.requests} requests >= {TARGET_SPEEDUP}x numpy concatenate "
                  "of frombuffer views",
        "target_met": met,
        "results": rows,
        "large_unpack_page_faults": fault_probes(args.repeat),
    }
    write_json(args.output, report)
    groups = [f"{r['op']}\n{r['case']}" for r in rows]
    bar_chart(
        args.output.with_suffix(".png"),
        f"Packing {args.requests} requests: numpy vs native (median of {args.repeat})\n"
        f"{report['cpu']}, {report['cpu_count']} CPUs, rev {report['git_revision']}",
        groups,
        {"numpy": [r["numpy_us"] for r in rows], "native": [r["native_us"] for r in rows]},
        "microseconds per batch (log)",
        notes=["speedups: " + ", ".join(f"{r['speedup']:.1f}x" for r in rows)],
    )
    for label, probe in report["large_unpack_page_faults"].items():
        print(f"unpack 64 x 588 KiB, {label}: {probe['median_ms']:.1f} ms, "
              f"{probe['faults_per_call']:.0f} minor faults per call")
    for case, ok in met.items():
        print(f"target (pack from raw bytes >= {TARGET_SPEEDUP}x), {case}: "
              f"{'met' if ok else 'NOT met'}")
    print(f"wrote {args.output} and {args.output.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
