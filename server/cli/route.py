"""``peregrine route set|status|promote|rollback|clear``: traffic routing of a running server.

Talks to the PeregrineAdmin gRPC service (proto/admin.proto). Every change is validated by the
server before it applies; a rejected change leaves the old table in force and exits 1 with the
gRPC status and the server's message.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import json_format

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.cli.connection import Metadata, add_connection_arguments, client_security
from server.routing.table import DEFAULT_SHADOW_PENDING, DEFAULT_SHADOW_PENDING_BYTES

#: Metadata naming the operator in the server's audit log (server/frontend/admin.py).
USER_HEADER = "x-peregrine-user"
VARIANT_FORM = "NAME=[MODEL:]VERSION:WEIGHT"
SHADOW_FORM = "NAME=[MODEL:]VERSION[:FRACTION]"


class UsageError(Exception):
    """A malformed argument, found before anything is sent."""


def _common(parser: argparse.ArgumentParser, defaults: bool) -> None:
    """Connection options, accepted before and after the action (``route --url X status``
    and ``route status --url X``); the action's copy only overrides when given."""

    def default(value: object) -> object:
        return value if defaults else argparse.SUPPRESS

    add_connection_arguments(parser, defaults)
    parser.add_argument("--user", default=default(""),
                        help=f"who makes the change, for the audit log (sent as {USER_HEADER}; "
                        "default: the server logs the peer address)")
    parser.add_argument("--timeout", type=float, default=default(30.0),
                        help="seconds to wait for the server; default 30")


def add_route_parser(commands: Any) -> None:
    route = commands.add_parser(
        "route", help="A/B splits, shadow mirroring and canaries of a running server",
        description="Traffic routing per model over the PeregrineAdmin gRPC service. Tables "
        "are validated by the server, applied atomically, persisted as routing.json beside "
        "the model's config.pbtxt and logged as 'routing changed' audit lines.",
    )
    _common(route, defaults=True)
    actions = route.add_subparsers(dest="route_command", required=True)

    put = actions.add_parser(
        "set", help="validate and apply a routing table",
        description="Apply a routing table. A request that names a version is never "
        "rerouted; one that names none goes to a variant: by a stable hash of its routing "
        "key when it carries one (request parameter --sticky-parameter), else at random "
        "in proportion to the weights.",
    )
    _common(put, defaults=False)
    put.add_argument("model", help="the model whose unversioned requests are routed")
    put.add_argument("--variant", action="append", default=[], metavar=VARIANT_FORM,
                     help="a destination: a version of MODEL (or of another model with the "
                     "same inputs and outputs) and its weight; repeat for each variant; an "
                     "empty VERSION means that model's latest, e.g. stable=1:90 new=2:10")
    put.add_argument("--shadow", metavar=SHADOW_FORM,
                     help="mirror a share of the routed traffic (FRACTION in (0, 1], default "
                     "1) to this target after the caller has its answer; its results are "
                     "only compared. With two parts, an all-digit first part is a VERSION")
    put.add_argument("--shadow-max-pending", type=int, default=0, metavar="N",
                     help="shadow copies waiting at most; more are dropped and counted "
                     "(default 256)")
    put.add_argument("--shadow-max-pending-bytes", type=int, default=0, metavar="BYTES",
                     help="bytes the waiting shadow copies may hold at most (their inputs and "
                     "the primary outputs kept for the comparison); more are dropped and "
                     "counted (default 67108864, 64 MiB)")
    put.add_argument("--canary", metavar="BASELINE:CANDIDATE",
                     help="run a guarded rollout from variant BASELINE to variant CANDIDATE")
    add_canary_arguments(put)
    put.add_argument("--sticky-parameter", default="", metavar="NAME",
                     help="request parameter holding the routing key (default routing_key; "
                     "a header reaches the parameters through --grpc-header-forward-pattern)")
    put.add_argument("--file", type=Path,
                     help="a RouteTable as JSON (the routing.json format); the flags above "
                     "override what it says")

    status = actions.add_parser(
        "status", help="tables in force with live figures per variant, shadow and canary",
    )
    _common(status, defaults=False)
    status.add_argument("model", nargs="?", help="one model (default: every routed model)")
    status.add_argument("--json", action="store_true", help="print the RouteStatus as JSON")

    for name, text in (
        ("promote", "canary: move to the next step now (the last step finishes the rollout)"),
        ("rollback", "canary: send all traffic back to the baseline"),
        ("clear", "remove the table: requests go to the version policy's latest again"),
    ):
        action = actions.add_parser(name, help=text, description=text)
        _common(action, defaults=False)
        action.add_argument("model")


def add_canary_arguments(parser: argparse._ActionsContainer) -> None:
    """A canary's steps and guard rails (``route set`` and ``optimize --rollout``); 0 or
    absent: the server's default."""
    parser.add_argument("--steps", metavar="P1,P2,...",
                        help="candidate weight in percent at each step (default 1,10,50,100)")
    parser.add_argument("--step-interval", type=float, default=0.0, metavar="SECS",
                        help="seconds per step before it may advance (default 60)")
    parser.add_argument("--max-p99-ratio", type=float, default=0.0, metavar="R",
                        help="roll back when the candidate's p99 exceeds R x the baseline's "
                        "(default 1.5)")
    parser.add_argument("--max-error-rate-increase", type=float, default=0.0, metavar="D",
                        help="roll back when the candidate's error rate exceeds the "
                        "baseline's + D (absolute, default 0.01)")
    parser.add_argument("--min-requests", type=int, default=0, metavar="N",
                        help="requests the candidate must serve in a step before it is "
                        "judged (default 20)")


def apply_canary_arguments(canary: admin.Canary, args: argparse.Namespace) -> None:
    """The steps and guard rails given by :func:`add_canary_arguments`' flags."""
    if args.steps:
        del canary.steps[:]
        canary.steps.extend(_steps(args.steps))
    if args.step_interval:
        canary.step_interval_secs = args.step_interval
    if args.max_p99_ratio:
        canary.max_p99_ratio = args.max_p99_ratio
    if args.max_error_rate_increase:
        canary.max_error_rate_increase = args.max_error_rate_increase
    if args.min_requests:
        canary.min_requests = args.min_requests


# -- building a table from the flags ----------------------------------------------------------


def _number(text: str, what: str, spec: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise UsageError(f"{what} of '{spec}' is not a number: '{text}'") from None


def parse_variant(spec: str) -> admin.Variant:
    """``NAME=[MODEL:]VERSION:WEIGHT`` -> Variant."""
    name, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or not name or len(parts) not in (2, 3):
        raise UsageError(f"--variant '{spec}': expected {VARIANT_FORM}")
    model = parts[0] if len(parts) == 3 else ""
    return admin.Variant(name=name, model=model, version=parts[-2],
                         weight=_number(parts[-1], "weight", spec))


def parse_shadow(spec: str) -> tuple[admin.Variant, float]:
    """``NAME=[MODEL:]VERSION[:FRACTION]`` -> (target, fraction; 0 when not given)."""
    name, sep, rest = spec.partition("=")
    parts = rest.split(":")
    if not sep or not name or not 1 <= len(parts) <= 3:
        raise UsageError(f"--shadow '{spec}': expected {SHADOW_FORM}")
    model, fraction = "", 0.0
    if len(parts) == 3:
        model, version = parts[0], parts[1]
        fraction = _number(parts[2], "fraction", spec)
    elif len(parts) == 2 and (parts[0] == "" or parts[0].isdigit()):
        version, fraction = parts[0], _number(parts[1], "fraction", spec)
    elif len(parts) == 2:
        model, version = parts
    else:
        version = parts[0]
    return admin.Variant(name=name, model=model, version=version), fraction


def _steps(text: str) -> list[float]:
    try:
        return [float(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--steps '{text}': expected percentages like 1,10,50,100") from None


def build_table(args: argparse.Namespace) -> admin.RouteTable:
    """The RouteTable the ``set`` flags describe (validation of meaning is the server's)."""
    table = admin.RouteTable()
    if args.file is not None:
        try:
            json_format.Parse(args.file.read_text(encoding="utf-8"), table)
        except OSError as exc:
            raise UsageError(f"--file: {exc}") from None
        except json_format.ParseError as exc:
            raise UsageError(f"--file {args.file}: {exc}") from None
        if table.model and table.model != args.model:
            raise UsageError(f"--file {args.file} is the table of '{table.model}', "
                             f"not of '{args.model}'")
    table.model = args.model
    if args.variant:
        del table.variants[:]
        table.variants.extend(parse_variant(spec) for spec in args.variant)
    if args.shadow:
        target, fraction = parse_shadow(args.shadow)
        table.shadow.target.CopyFrom(target)
        table.shadow.fraction = fraction
    for flag, field in (("--shadow-max-pending", "max_pending"),
                        ("--shadow-max-pending-bytes", "max_pending_bytes")):
        value = getattr(args, f"shadow_{field}")
        if not value:
            continue
        if not args.shadow and not table.HasField("shadow"):
            raise UsageError(f"{flag} needs --shadow")
        setattr(table.shadow, field, value)
    canary_flags = (args.steps, args.step_interval, args.max_p99_ratio,
                    args.max_error_rate_increase, args.min_requests)
    if args.canary:
        baseline, sep, candidate = args.canary.partition(":")
        if not sep or not baseline or not candidate:
            raise UsageError(f"--canary '{args.canary}': expected BASELINE:CANDIDATE")
        table.canary.baseline = baseline
        table.canary.candidate = candidate
    elif any(canary_flags) and not table.HasField("canary"):
        raise UsageError("--steps, --step-interval, --max-* and --min-requests need --canary")
    if any(canary_flags):
        apply_canary_arguments(table.canary, args)
    if args.sticky_parameter:
        table.sticky_parameter = args.sticky_parameter
    if not table.variants:
        raise UsageError(f"no variants: give --variant {VARIANT_FORM} (or --file)")
    return table


# -- printing -------------------------------------------------------------------------------------


def _g(value: float) -> str:
    return f"{value:g}"


def _mib(size: int) -> str:
    return f"{size / 2**20:g} MiB"


def _target(model: str, variant: admin.Variant | admin.VariantStatus) -> str:
    where = variant.model or model
    return f"{where}:{variant.version or 'latest'}"


def format_status(status: admin.RouteStatus) -> str:
    table = status.table
    model = table.model
    lines = [f"model {model}  (sticky parameter: {table.sticky_parameter or 'routing_key'})"]
    rows = [("VARIANT", "TARGET", "WEIGHT", "REQUESTS", "ERRORS", "P99_MS")]
    rows += [(v.name, _target(model, v), _g(v.weight), str(v.requests), str(v.errors),
              f"{v.p99_ms:.2f}") for v in status.variants]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        lines.append("  " + "  ".join(
            cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip())
    if table.HasField("shadow"):
        spec, live = table.shadow, status.shadow
        pending = spec.max_pending or DEFAULT_SHADOW_PENDING
        pending_bytes = spec.max_pending_bytes or DEFAULT_SHADOW_PENDING_BYTES
        lines.append(
            f"  shadow {spec.target.name} -> {_target(model, spec.target)}"
            f" (fraction {_g(spec.fraction or 1.0)}, max pending {pending} copies,"
            f" {_mib(pending_bytes)}):"
            f" mirrored {live.mirrored}, dropped {live.dropped}, failed {live.failed},"
            f" compared {live.compared}"
        )
        lines.append(
            f"    agreement {live.agreement:.4f}, abs diff max {live.max_abs_diff:.6g}"
            f" mean {live.mean_abs_diff:.6g}, rel diff max {live.max_rel_diff:.6g}"
        )
    if status.canary_state != "none" or table.HasField("canary"):
        spec = table.canary
        steps = ",".join(_g(s) for s in spec.steps) or "1,10,50,100"
        line = f"  canary {status.canary_state or 'none'}"
        if spec.baseline:
            line += (f": {spec.baseline} -> {spec.candidate}, step {status.canary_step + 1}"
                     f" of [{steps}]")
        lines.append(line)
        if status.canary_reason:
            lines.append(f"    reason: {status.canary_reason}")
    if status.persist_error:
        lines.append(f"  WARNING: routing file {status.persist_error}")
    return "\n".join(lines)


def _print(status: admin.RouteStatus, as_json: bool) -> None:
    if as_json:
        print(json_format.MessageToJson(status, indent=2, preserving_proto_field_name=True,
                                        always_print_fields_with_no_presence=True))
    else:
        print(format_status(status))


# -- running --------------------------------------------------------------------------------------


def _call(stub: admin_grpc.PeregrineAdminStub, args: argparse.Namespace,
          metadata: Metadata) -> None:
    command = args.route_command
    if command == "set":
        table = build_table(args)
        status = stub.SetRoute(admin.SetRouteRequest(table=table), timeout=args.timeout,
                               metadata=metadata)
        print(f"routing table of '{table.model}' applied")
        _print(status, False)
    elif command == "status":
        if args.model:
            status = stub.GetRoute(admin.RouteRequest(model=args.model), timeout=args.timeout,
                                   metadata=metadata)
            _print(status, args.json)
            return
        listed = stub.ListRoutes(admin.ListRoutesRequest(), timeout=args.timeout,
                                 metadata=metadata)
        if args.json:
            print(json.dumps([json_format.MessageToDict(
                s, preserving_proto_field_name=True,
                always_print_fields_with_no_presence=True) for s in listed.routes], indent=2))
        elif not listed.routes:
            print("no routing tables")
        else:
            print("\n\n".join(format_status(s) for s in listed.routes))
    elif command == "clear":
        cleared = stub.ClearRoute(admin.RouteRequest(model=args.model), timeout=args.timeout,
                                  metadata=metadata)
        print(f"routing table of '{args.model}' cleared")
        if cleared.persist_error:
            print(f"WARNING: routing file {cleared.persist_error}")
    else:
        rpc = stub.Promote if command == "promote" else stub.Rollback
        status = rpc(admin.RouteRequest(model=args.model), timeout=args.timeout,
                     metadata=metadata)
        _print(status, False)


def run_route(args: argparse.Namespace) -> int:
    prefix = f"peregrine route {args.route_command}"
    security = client_security(args, prefix)
    metadata = (*security.metadata, *([(USER_HEADER, args.user)] if args.user else []))
    with security.channel(args.url) as channel:
        stub = admin_grpc.PeregrineAdminStub(channel)
        try:
            _call(stub, args, metadata)
        except UsageError as exc:
            print(f"{prefix}: {exc}", file=sys.stderr)
            return 2
        except grpc.RpcError as exc:
            print(f"{prefix}: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0
