"""Micro-benchmark: native (server._native) vs reference BYTES codec, encode and decode.

Run from anywhere, after building the extension (``python setup.py build_ext --inplace``):

    python bench/micro/bytes_codec.py [--repeat 7] [--output PATH]

Prints a table of the median time per call and writes the same numbers as JSON
(default: bench/results/micro_bytes_codec.json).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.micro._report import machine, timings, write_json  # noqa: E402
from bench.results_md import RESULTS_DIR  # noqa: E402

DEFAULT_OUTPUT = RESULTS_DIR / "micro_bytes_codec.json"
COUNTS = (1, 64, 4096)
SIZES = (16, 1024)


def load_codecs() -> tuple[ModuleType, ModuleType]:
    from server import _native
    from server.codec import bytes_reference

    return _native, bytes_reference


def run(repeat: int, min_time: float) -> list[dict[str, Any]]:
    native, reference = load_codecs()
    rows: list[dict[str, Any]] = []
    for count in COUNTS:
        for size in SIZES:
            items = [bytes([i % 251]) * size for i in range(count)]
            raw = native.encode_bytes(items)
            assert raw == reference.encode_bytes(items)
            assert native.decode_bytes(raw, count) == items == reference.decode_bytes(raw, count)
            for op, native_fn, reference_fn in (
                (
                    "encode",
                    lambda items=items: native.encode_bytes(items),
                    lambda items=items: reference.encode_bytes(items),
                ),
                (
                    "decode",
                    lambda raw=raw, count=count: native.decode_bytes(raw, count),
                    lambda raw=raw, count=count: reference.decode_bytes(raw, count),
                ),
            ):
                native_s = timings(native_fn, repeat, min_time)["median_s"]
                reference_s = timings(reference_fn, repeat, min_time)["median_s"]
                rows.append(
                    {
                        "op": op,
                        "count": count,
                        "element_bytes": size,
                        "encoded_bytes": len(raw),
                        "native_us": native_s * 1e6,
                        "reference_us": reference_s * 1e6,
                        "speedup": reference_s / native_s,
                        "native_mb_per_s": len(raw) / native_s / 1e6,
                    }
                )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = (
        f"{'op':<7}{'count':>7}{'elem B':>8}{'total B':>10}"
        f"{'native us':>12}{'ref us':>12}{'speedup':>9}{'native MB/s':>13}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r['op']:<7}{r['count']:>7}{r['element_bytes']:>8}{r['encoded_bytes']:>10}"
            f"{r['native_us']:>12.2f}{r['reference_us']:>12.2f}{r['speedup']:>8.1f}x"
            f"{r['native_mb_per_s']:>13.0f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON output path")
    args = parser.parse_args(argv)

    rows = run(args.repeat, args.min_time)
    print_table(rows)

    report = {
        "benchmark": "micro_bytes_codec",
        **machine(),
        "repeat": args.repeat,
        "min_time_s": args.min_time,
        "statistic": "median seconds per call, reported in microseconds",
        "results": rows,
    }
    write_json(args.output, report)
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
