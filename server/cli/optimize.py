"""``peregrine optimize``: a new version of an ONNX model made beside a source version
(graph optimisation, dynamic or static INT8, FP16), measured side by side with it, and with
``--rollout`` taken through a running server: shadow, then a guarded canary."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from server.cli.connection import add_connection_arguments, client_security
from server.cli.route import USER_HEADER, add_canary_arguments, apply_canary_arguments
from server.interfaces import Backend
from server.optimize import METHODS
from server.spec import ModelSpec

ModelOpener = Callable[[Path, str], tuple[ModelSpec, Callable[[str], Backend]]]


def add_optimize_parser(commands: Any) -> None:
    from server.settings import default_repository

    parser = commands.add_parser(
        "optimize", help="make an optimised version of an ONNX model and roll it out",
        description="Make a new version beside VERSION: ONNX Runtime graph optimisation saved "
        "offline (graph), INT8 quantisation with dynamic activation ranges (dynamic-int8) or "
        "calibrated ones (static-int8), or FP16 weights and arithmetic for GPUs (fp16). "
        "Prints size, latency and throughput at batch 1 and 32 and the accuracy change (or "
        "the agreement with VERSION) side by side, and writes the new version's model card. "
        "Needs the optimize extra: pip install 'peregrine[optimize]'.",
    )
    parser.add_argument("--model", required=True)
    parser.add_argument("--version", required=True, help="the source version")
    parser.add_argument("--repository", type=Path, default=None,
                        help=f"model repository (default {default_repository()})")
    parser.add_argument("--method", choices=METHODS, default="dynamic-int8",
                        help="default dynamic-int8")
    parser.add_argument("--new-version", default="",
                        help="number of the new version (default: the next free one)")
    parser.add_argument("--calibration", type=Path, default=None, metavar="FILE",
                        help="static-int8's calibration rows (.npz, .npy, .csv, .parquet, as "
                        "'peregrine drift profile' reads them); default: drawn from the "
                        "source version's drift reference profile")
    parser.add_argument("--eval", type=Path, default=None, metavar="FILE",
                        help="rows to measure on (same formats); an .npz may hold their "
                        "labels as an array 'labels'. Default: the calibration rows, else "
                        "random inputs")
    parser.add_argument("--labels", type=Path, default=None, metavar="FILE",
                        help="labels of the --eval rows (.npy, or .npz with 'labels'): the "
                        "report shows accuracy; without labels, agreement with VERSION")
    parser.add_argument("--threads", type=int, default=1,
                        help="ONNX Runtime intra-op threads for both versions' timings")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    rollout = parser.add_argument_group(
        "rollout", "with --rollout: through the server at --url, shadow the new version "
        "against VERSION, then run a guarded canary (as 'peregrine route set --canary')")
    rollout.add_argument("--rollout", action="store_true")
    add_connection_arguments(rollout)
    rollout.add_argument("--user", default="", help=f"for the audit log (sent as {USER_HEADER})")
    rollout.add_argument("--shadow-comparisons", type=int, default=200, metavar="N",
                         help="shadow comparisons to wait for before judging (default 200)")
    rollout.add_argument("--min-agreement", type=float, default=0.99, metavar="A",
                         help="least shadow agreement of class outputs to go on (default "
                         "0.99)")
    rollout.add_argument("--max-rel-error", type=float, default=None, metavar="E",
                         help="largest relative difference of float outputs in the shadow "
                         "to go on (default: not judged)")
    add_canary_arguments(rollout)
    rollout.add_argument("--phase-timeout", type=float, default=600.0, metavar="SECS",
                         help="seconds the load, the shadow and each canary step may take "
                         "(default 600)")
    rollout.add_argument("--replay", action="store_true",
                         help="send the --eval rows (or the calibration rows) to the model "
                         "during the rollout, for a server without traffic of its own")


def run_optimize(args: argparse.Namespace, open_model: ModelOpener) -> int:
    from server.errors import PeregrineError
    from server.settings import default_repository

    repository = args.repository or default_repository()
    try:
        from server.optimize import build, data

        spec, _ = open_model(repository, args.model)
        report = build.run(build.Request(
            repository=repository, spec=spec, version=args.version, method=args.method,
            new_version=args.new_version, calibration=args.calibration, eval=args.eval,
            labels=args.labels, threads=args.threads,
        ))
    except ImportError as exc:
        print(f"peregrine optimize: {exc}", file=sys.stderr)
        return 2
    except (ValueError, OSError, PeregrineError) as exc:
        print(f"peregrine optimize: {exc}", file=sys.stderr)
        return 2
    say: Callable[[str], None] = (lambda _: None) if args.json else print
    if args.json:
        document: dict[str, Any] = {"report": report.as_json()}
    else:
        print(table(report))
    if args.rollout:
        outcome = _rollout(args, spec, report, data, say)
        if args.json:
            document["rollout"] = {"ok": outcome.ok, "reason": outcome.reason}
        else:
            print(f"rollout {'done' if outcome.ok else 'stopped'}: {outcome.reason}")
    if args.json:
        print(json.dumps(document, indent=2))
    return 0 if not args.rollout or outcome.ok else 1


def _rollout(args: argparse.Namespace, spec: ModelSpec, report: Any, data: Any,
             say: Callable[[str], None]) -> Any:
    import grpc

    from server._pb import admin_pb2 as admin
    from server.cli.rollout import Outcome, Plan, Replay, Rollout

    security = client_security(args, "peregrine optimize")
    metadata = (*security.metadata, *([(USER_HEADER, args.user)] if args.user else []))
    canary = admin.Canary()
    apply_canary_arguments(canary, args)
    plan = Plan(model=spec.name, source=report.source.version,
                candidate=report.candidate.version, comparisons=args.shadow_comparisons,
                min_agreement=args.min_agreement, max_rel_error=args.max_rel_error,
                canary=canary, timeout=args.phase_timeout)
    with security.channel(args.url) as channel:
        rollout = Rollout(channel, metadata, 30.0, say)
        try:
            if not args.replay:
                return rollout.run(plan)
            rows = data.inputs(args.eval, spec) if args.eval is not None \
                else data.from_profile(args.repository, spec, report.source.version)[0] \
                if args.calibration is None else data.inputs(args.calibration, spec)
            with Replay(channel, metadata, spec, rows):
                return rollout.run(plan)
        except grpc.RpcError as exc:
            return Outcome(False, f"{exc.code().name}: {exc.details()}")


def _size(n: int) -> str:
    return f"{n / 1024:.1f} KiB" if n < 2**20 else f"{n / 2**20:.2f} MiB"


def _change(before: float, after: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else ""


def table(report: Any) -> str:
    """The side-by-side report: source, new version, change."""
    src, new, cmp = report.source, report.candidate, report.comparison
    rows = [("", f"version {src.version} (source)", f"version {new.version} ({report.method})",
             "change"),
            ("file size", _size(src.size_bytes), _size(new.size_bytes),
             _change(src.size_bytes, new.size_bytes))]
    for mine, theirs in zip(src.speeds, new.speeds, strict=True):
        rows.append((f"latency b{mine.batch} (median)", f"{mine.latency_ms:.4f} ms",
                     f"{theirs.latency_ms:.4f} ms", _change(mine.latency_ms, theirs.latency_ms)))
        rows.append((f"throughput b{mine.batch}", f"{mine.rows_per_s:,.0f} rows/s",
                     f"{theirs.rows_per_s:,.0f} rows/s",
                     _change(mine.rows_per_s, theirs.rows_per_s)))
    if src.accuracy is not None and new.accuracy is not None:
        rows.append(("accuracy", f"{src.accuracy:.4f}", f"{new.accuracy:.4f}",
                     f"{(new.accuracy - src.accuracy) * 100:+.2f} pts"))
    if cmp.top1_agreement is not None:
        rows.append(("top-1 agreement with source", "", f"{cmp.top1_agreement:.4f}", ""))
    rows.append(("max abs / rel error", "", f"{cmp.max_abs_error:.3g} / {cmp.max_rel_error:.3g}",
                 ""))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [f"{report.model}: version {new.version} written to {report.path}",
             f"measured on {report.comparison.rows} rows of {report.evaluation}, "
             f"{report.threads} thread(s)"
             + (f"; calibrated on {report.calibration}" if report.calibration else "")]
    lines += ["  " + "  ".join(c.ljust(widths[i]) if i == 0 else c.rjust(widths[i])
                               for i, c in enumerate(r)).rstrip() for r in rows]
    return "\n".join(lines)
