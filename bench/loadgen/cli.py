"""``peregrine bench`` (also ``python -m bench``): run, compare, all."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.loadgen.sweep import SweepError, parse_concurrency, parse_rate
from server.cli.connection import add_connection_arguments, client_security, redact_token

DEFAULT_OUT_DIR = Path("bench-runs")


def _shape(text: str) -> tuple[str, tuple[int, ...]]:
    name, sep, dims = text.rpartition(":")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"'{text}': expected NAME:D1,D2,...")
    try:
        values = tuple(int(d) for d in dims.split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}': dims must be integers") from None
    if not values or any(d <= 0 for d in values):
        raise argparse.ArgumentTypeError(f"'{text}': dims must be positive integers")
    return name, values


def _sweep(parse: type[int] | type[float]) -> Callable[[str], list[int] | list[float]]:
    def convert(text: str) -> list[int] | list[float]:
        try:
            return parse_concurrency(text) if parse is int else parse_rate(text)
        except SweepError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return convert


def _add_run_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    run = commands.add_parser(
        "run", help="drive one server and report throughput and latency",
        description="Drive one V2 gRPC server with a closed loop (--concurrency) or an open "
        "loop (--rate), unary or streaming, and write a JSON document and a PNG chart.",
    )
    target = run.add_argument_group("target")
    add_connection_arguments(target)
    target.add_argument("-m", "--model", required=True)
    target.add_argument("--model-version", default="", help="default: the server's choice")
    target.add_argument("--server-pid", type=int, default=None,
                        help="server process id, to report its CPU use (and its children's); "
                        "default: the process listening on the url's port, when on loopback")
    load = run.add_argument_group("load")
    load.add_argument("--rpc", choices=("unary", "stream"), default="unary",
                      help="ModelInfer or ModelStreamInfer (default %(default)s)")
    load.add_argument("-c", "--concurrency", type=_sweep(int), default=None,
                      help="closed loop: requests in flight, a sweep such as 1,8,32,64 or "
                      "8:64:8 (default 1)")
    load.add_argument("-r", "--rate", type=_sweep(float), default=None,
                      help="open loop: requests/s, a sweep such as 500:5000:500; latency "
                      "counts from the scheduled send time")
    load.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                      help="open loop arrival process (default %(default)s)")
    load.add_argument("--max-inflight", type=int, default=1024,
                      help="open loop: cap on requests in flight (default %(default)s)")
    amount = load.add_mutually_exclusive_group()
    amount.add_argument("-d", "--duration", type=float, default=None,
                        help="measured seconds per step (default 10)")
    amount.add_argument("-n", "--requests", type=int, default=None,
                        help="measured requests per step, instead of a duration")
    load.add_argument("--warmup", type=float, default=2.0,
                      help="seconds of load before measuring, per step (default %(default)s)")
    load.add_argument("--repeats", type=int, default=1,
                      help="run each step this many times, report the median (default 1)")
    load.add_argument("-p", "--processes", type=int, default=1,
                      help="generator processes; their histograms are merged (default 1)")
    load.add_argument("--stream-format", choices=("auto", "triton", "plain"), default="auto",
                      help="stream answers: triton = ModelStreamInferResponse, plain = bare "
                      "ModelInferResponse (MLServer); auto picks by ServerMetadata name")
    load.add_argument("--timeout", type=float, default=30.0, help="per-request deadline, s")
    load.add_argument("--drain", type=float, default=10.0,
                      help="seconds to wait for a step's last answers (default %(default)s)")
    data = run.add_argument_group("request data")
    data.add_argument("-b", "--batch-size", type=int, default=1,
                      help="rows per request for a batching model (default 1)")
    data.add_argument("--shape", type=_shape, action="append", default=[],
                      help="NAME:D1,D2 dims after the batch dim for an input with -1 dims "
                      "(repeatable)")
    data.add_argument("--dynamic-dim", type=int, default=1,
                      help="value for other -1 dims (default %(default)s)")
    data.add_argument("--input-file", type=Path, default=None,
                      help=".npy, .npz (one array per input) or .json (V2 request body) "
                      "instead of random data")
    data.add_argument("--input-name", default=None, help="input name for a .npy file")
    data.add_argument("--seed", type=int, default=0)
    out = run.add_argument_group("output")
    out.add_argument("--label", default="", help="name of this run in tables and charts")
    out.add_argument("--out-dir", type=Path, default=DEFAULT_OUT_DIR,
                     help="where the JSON and PNG go (default %(default)s/)")
    out.add_argument("--json", type=Path, default=None, help="JSON path (overrides --out-dir)")
    out.add_argument("--plot", type=Path, default=None, help="PNG path (overrides --out-dir)")
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument("--progress", choices=("auto", "always", "never"), default="auto",
                     help="live progress line on stderr (auto: when it is a terminal)")
    out.add_argument("-q", "--quiet", action="store_true", help="no table on stdout")


def build_parser(prog: str = "peregrine bench") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="Load tester for V2 gRPC servers")
    commands = parser.add_subparsers(dest="command", required=True)
    _add_run_parser(commands)
    compare = commands.add_parser("compare", help="ratios of runs against the first, one chart")
    compare.add_argument("runs", type=Path, nargs="+", help="run JSON files (first = baseline)")
    compare.add_argument("--plot", type=Path, default=None,
                         help="PNG path (default: compare.png beside the first run)")
    compare.add_argument("--labels", default=None, help="comma-separated names of the runs")
    commands.add_parser("all", help="the full comparison (python -m bench.compare)",
                        add_help=False)
    return parser


def _run(args: argparse.Namespace) -> int:
    from bench.loadgen.progress import ProgressLine
    from bench.loadgen.runner import RunConfig, run
    from bench.loadgen.table import run_summary

    if args.concurrency and args.rate:
        print("peregrine bench run: give --concurrency or --rate, not both", file=sys.stderr)
        return 2
    duration = args.duration if args.duration is not None or args.requests else 10.0
    config = RunConfig(
        url=args.url, security=client_security(args, "peregrine bench run"),
        model=args.model, version=args.model_version, rpc=args.rpc,
        concurrency=tuple(args.concurrency or (1,)), rates=tuple(args.rate or ()),
        arrival=args.arrival, max_inflight=args.max_inflight, duration_s=duration,
        requests=args.requests, warmup_s=args.warmup, repeats=args.repeats,
        processes=args.processes, batch_size=args.batch_size, shapes=dict(args.shape),
        dynamic_dim=args.dynamic_dim, input_file=args.input_file, input_name=args.input_name,
        seed=args.seed, timeout_s=args.timeout, drain_s=args.drain,
        server_pid=args.server_pid, label=args.label, stream_format=args.stream_format,
    )
    progress = ProgressLine(None if args.progress == "auto" else args.progress == "always")
    try:
        document = run(config, progress,
                       command=[Path(sys.argv[0]).name, *redact_token(sys.argv[1:])])
    except (ValueError, TimeoutError, OSError) as exc:
        print(f"peregrine bench run: {exc}", file=sys.stderr)
        return 1
    stem = f"{args.model}_{args.rpc}_{config.mode}_{time.strftime('%Y%m%d-%H%M%S')}"
    json_path = args.json or args.out_dir / f"{stem}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if not args.quiet:
        print(run_summary(document))
        print(f"\nrun: {json_path}")
    if not args.no_plot:
        _chart(args, document, json_path, config.mode)
    return 0


def _chart(args: argparse.Namespace, document: dict[str, Any], json_path: Path,
           mode: str) -> None:
    """The run's PNG beside its JSON; without matplotlib, one line saying which extra has it."""
    try:
        from bench.loadgen.plots import plot_runs
    except ImportError:
        print("peregrine bench run: no chart (matplotlib is not installed; it comes with the "
              "'bench' extra: pip install -e '.[bench]', or pass --no-plot)", file=sys.stderr)
        return
    plot_path = args.plot or json_path.with_suffix(".png")
    plot_runs([document], [args.label or args.model], plot_path,
              title=f"{args.model} {args.rpc} {mode} loop")
    if not args.quiet:
        print(f"chart: {plot_path}")


def _compare(args: argparse.Namespace) -> int:
    from bench.loadgen.compare_runs import compare
    from bench.loadgen.schema import SchemaError

    labels = args.labels.split(",") if args.labels else None
    plot = args.plot or args.runs[0].parent / "compare.png"
    try:
        print(compare(args.runs, plot, labels))
    except (SchemaError, ValueError, OSError) as exc:
        print(f"peregrine bench compare: {exc}", file=sys.stderr)
        return 2
    return 0


def exit_on_sigterm() -> None:
    """Turn SIGTERM into SystemExit, so ``with`` blocks stop the servers and generator
    processes they started (background shells start us with SIGINT ignored)."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))


def main(argv: Sequence[str] | None = None, prog: str = "peregrine bench") -> int:
    exit_on_sigterm()
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["all"]:
            from bench.compare.run_all import main as compare_all

            return compare_all(argv[1:])
        args = build_parser(prog).parse_args(argv)
        if args.command == "run":
            return _run(args)
        return _compare(args)
    except ModuleNotFoundError as exc:  # `compare` and `all` draw charts: matplotlib
        print(f"{prog}: {exc.name or exc} is not installed; it comes with the 'bench' extra: "
              "pip install -e '.[bench]'", file=sys.stderr)
        return 2
