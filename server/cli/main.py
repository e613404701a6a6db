"""The ``peregrine`` command."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence
from pathlib import Path

from server import __version__
from server.cli.auth import add_auth_parser, run_auth
from server.cli.batch import add_batch_parser
from server.cli.drift import add_drift_parser
from server.cli.health import add_health_parser, run_health
from server.cli.optimize import add_optimize_parser
from server.cli.repo import add_repo_parser, run_repo
from server.cli.route import add_route_parser, run_route
from server.cli.trt import add_trt_parser, run_trt
from server.errors import ModelLoadError
from server.logs import configure_logging
from server.security.auth_file import AuthFileError
from server.settings import OPTIONS, load_settings


def _serve_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="serve a model repository over gRPC (Open Inference Protocol)",
        description="Serve a model repository over gRPC (Open Inference Protocol / KServe V2). "
        "Every option can also be set by an environment variable PEREGRINE_<OPTION> or a key "
        "in a TOML file; flags win over variables, variables over the file.",
    )
    serve.add_argument("--config-file", type=Path, default=None,
                       help="TOML file of options (keys as the flags, with underscores; "
                       "optionally under [server]). Env: PEREGRINE_CONFIG_FILE.")
    for option in OPTIONS:
        serve.add_argument(
            option.flag, dest=option.name, default=None, metavar=option.name.upper(),
            choices=option.choices or None, help=f"{option.help} Env: {option.env}.",
            action="append" if option.repeatable else "store",
        )


def _bench_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Listed for --help only: main() hands everything after ``bench`` to bench.loadgen.cli."""
    commands.add_parser(
        "bench", add_help=False,
        help="load-test a V2 gRPC server: run, compare, all (see 'peregrine bench --help')",
    )


def _run_bench(argv: Sequence[str]) -> int:
    """The load tester lives in bench/loadgen/ of a source checkout, beside server/; the wheel
    does not install it."""
    import server

    checkout = Path(server.__file__).resolve().parent.parent
    if not (checkout / "bench" / "loadgen").is_dir():
        print("peregrine bench: the load tester runs from a source checkout (git clone, then "
              "pip install -e .); this installation has no bench/loadgen/", file=sys.stderr)
        return 2
    if str(checkout) not in sys.path:
        sys.path.insert(0, str(checkout))
    try:
        from bench.loadgen.cli import main as bench_main
    except ImportError as exc:
        print(f"peregrine bench: {exc}; install the 'bench' extra: pip install -e '.[bench]'",
              file=sys.stderr)
        return 2
    return bench_main(argv, prog="peregrine bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="peregrine", description="Peregrine inference server")
    parser.add_argument("--version", action="version", version=f"peregrine {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    _serve_parser(commands)
    add_repo_parser(commands)
    add_route_parser(commands)
    add_health_parser(commands)
    add_drift_parser(commands)
    add_trt_parser(commands)
    add_optimize_parser(commands)
    add_auth_parser(commands)
    add_batch_parser(commands)
    _bench_parser(commands)
    return parser


def _flag_value(raw: str | list[str] | None) -> str | None:
    """A repeatable flag's values, joined as its option parses them (';')."""
    return ";".join(raw) if isinstance(raw, list) else raw


def _run_serve(args: argparse.Namespace) -> int:
    flags = {option.name: _flag_value(getattr(args, option.name)) for option in OPTIONS}
    try:
        settings = load_settings(flags, config_file=args.config_file)
    except ValueError as exc:
        print(f"peregrine serve: {exc}", file=sys.stderr)
        return 2
    configure_logging(settings.log_level, settings.log_format)
    from server.app import serve

    try:
        if settings.uvloop:
            import uvloop

            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                runner.run(serve(settings))
        else:
            asyncio.run(serve(settings))
    except (OSError, ModelLoadError, AuthFileError) as exc:
        print(f"peregrine serve: {exc}", file=sys.stderr)
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["bench"]:  # its own parser, imported only when asked for
        return _run_bench(arguments[1:])
    args = build_parser().parse_args(arguments)
    if args.command == "serve":
        return _run_serve(args)
    if args.command == "repo":
        return run_repo(args)
    if args.command == "route":
        return run_route(args)
    if args.command == "auth":
        return run_auth(args)
    if args.command == "health":
        return run_health(args)
    if args.command == "drift":
        from server.app import open_model_offline
        from server.cli.drift import run_drift

        return run_drift(args, open_model_offline)
    if args.command == "optimize":
        from server.app import open_model_offline
        from server.cli.optimize import run_optimize

        return run_optimize(args, open_model_offline)
    if args.command == "batch":
        configure_logging("WARNING", "text")  # stderr is the progress bar's
        from server.app import open_offline
        from server.cli.batch import run_batch

        return run_batch(args, open_offline)
    if args.command == "trt":
        configure_logging("WARNING", "text")  # stderr is the progress bar's
        from server.app import backend_factories

        return run_trt(args, backend_factories)
    raise AssertionError(f"unhandled command {args.command}")
