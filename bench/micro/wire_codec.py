"""Micro-benchmark: the native wire codec vs the protobuf runtime, per ModelInfer call.

Run from anywhere, after building the extension (``python setup.py build_ext --inplace``):

    python bench/micro/wire_codec.py [--repeat 7] [--min-time 0.05] [--output PATH]

Cases: an MLP-like request (one FP32 [1, 64] raw input, two requested outputs; the response
carries FP32 [1, 10] logits and an INT64 [1, 1] class) and a CNN-like one (FP32
[1, 3, 32, 32] raw input; FP32 [1, 10] and [1, 512] outputs). ``decode`` is request bytes ->
InferRequest (parse + the shared decoding logic), ``encode`` is InferResponse -> response
bytes, unary; the protobuf path is what PEREGRINE_NATIVE=0 runs. Runs of the two paths are
interleaved. Writes bench/results/micro_wire_codec.json (medians; quartiles in the JSON).
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

from bench.micro._report import machine, paired, write_json  # noqa: E402
from bench.results_md import RESULTS_DIR  # noqa: E402

DEFAULT_OUTPUT = RESULTS_DIR / "micro_wire_codec.json"


def cases() -> list[tuple[str, bytes, Any]]:
    """(case, request bytes, response) for the MLP-like and the CNN-like request."""
    from server._pb import grpc_service_pb2 as pb
    from server.types import DataType, InferResponse, OutputTensor

    rng = np.random.default_rng(0)
    made = []
    for case, shape, outputs in (
        ("mlp [1,64]", [1, 64], [("logits", DataType.FP32, (1, 10)),
                                 ("class", DataType.INT64, (1, 1))]),
        ("cnn [1,3,32,32]", [1, 3, 32, 32], [("logits", DataType.FP32, (1, 10)),
                                              ("features", DataType.FP32, (1, 512))]),
    ):
        message = pb.ModelInferRequest(model_name="model", id="request-1")
        message.inputs.add(name="input", datatype="FP32", shape=shape)
        for name, _, _ in outputs:
            message.outputs.add(name=name)
        message.raw_input_contents.append(rng.random(shape, dtype=np.float32).tobytes())
        response = InferResponse("model", "1", "request-1", [
            OutputTensor(name, dt, rng.random(dims).astype(dt.numpy_dtype))
            for name, dt, dims in outputs])
        made.append((case, message.SerializeToString(), response))
    return made


def run(repeat: int, min_time: float) -> list[dict[str, Any]]:
    from server.codec.wire import NativeWireCodec, ProtobufWireCodec

    native, protobuf = NativeWireCodec(), ProtobufWireCodec()
    rows: list[dict[str, Any]] = []
    for case, data, response in cases():
        encoded = native.encode_response_bytes(response, None, False)
        assert encoded == protobuf.encode_response_bytes(response, None, False)
        for op, fns in (
            ("decode", {
                "native": lambda data=data: native.decode_request_bytes(data, None, None),
                "protobuf": lambda data=data: protobuf.decode_request_bytes(data, None, None),
            }),
            ("encode", {
                "native": lambda r=response: native.encode_response_bytes(r, None, False),
                "protobuf": lambda r=response: protobuf.encode_response_bytes(r, None, False),
            }),
        ):
            times = paired(fns, repeat, min_time)
            native_s = times["native"]["median_s"]
            protobuf_s = times["protobuf"]["median_s"]
            rows.append({
                "op": op,
                "case": case,
                "message_bytes": len(data) if op == "decode" else len(encoded),
                "native_us": native_s * 1e6,
                "protobuf_us": protobuf_s * 1e6,
                "speedup": protobuf_s / native_s,
                "timings": times,
            })
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    header = f"{'op':<8}{'case':<18}{'bytes':>8}{'protobuf us':>13}{'native us':>11}{'speedup':>9}"
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['op']:<8}{r['case']:<18}{r['message_bytes']:>8}{r['protobuf_us']:>13.2f}"
              f"{r['native_us']:>11.2f}{r['speedup']:>8.2f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeat", type=int, default=7, help="timed runs per case (median)")
    parser.add_argument("--min-time", type=float, default=0.05, help="seconds per timed run")
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="JSON output path")
    args = parser.parse_args(argv)

    rows = run(args.repeat, args.min_time)
    print_table(rows)
    report = {
        "benchmark": "micro_wire_codec",
        **machine(),
        "command": "python bench/micro/wire_codec.py " + " ".join(argv or sys.argv[1:]),
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
