"""Routing and shadowing overhead: throughput and latency with no routing table, a 50/50 A/B
table, and the A/B table plus a shadow mirroring 100 % or 10 % of the requests.

One ``peregrine serve`` subprocess (pinned to CPU 0 with ``taskset`` where there is one)
serves a temporary copy of the example ``mlp_classifier`` with both versions (version policy
``all``), one ONNX Runtime intra-op thread and spinning off, as in the comparison, and the
example's dynamic batching. The load generator of ``peregrine bench run`` (one process, pinned
to CPU 1 with this one) keeps a closed loop of unversioned requests in flight, unary or on a
stream. Scenarios, set through the PeregrineAdmin service before each step:

- ``none``: no routing table (the version policy's latest, version 2, answers);
- ``ab``: ``a=1:50``, ``b=2:50`` (each request picks a variant at random);
- ``ab+shadow100``: the A/B table plus a shadow to version 2 with fraction 1.0;
- ``ab+shadow10``: the same with fraction 0.1.

Every table is cleared and set afresh before its step, so the shadow's counters (mirrored,
dropped, failed, compared; GetRoute, read right after the step) are that step's own. Each
(RPC, concurrency) runs every scenario ``--repeats`` times, in a rotating order so that
background load hits every scenario alike; medians are reported, with ratios against
``none``. The shadow runs on the server's own event loop and core by design: at 100 % it
doubles the model work per request.

Results: ``bench/results/routing_overhead.json``, ``routing_overhead.png`` and the "Routing
and shadowing overhead" section of ``bench/RESULTS.md`` (replaced in place)::

    .venv/bin/python -m bench.studies.routing_overhead [--seconds 6] [--repeats 3] \\
        [--concurrency 8,32] [--rpc unary,stream]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.compare.model_repo import ORT_PARAMETERS, ensure_examples, set_parameters
from bench.compare.servers import PeregrineProcess
from bench.loadgen.cpu import pin_self
from bench.loadgen.environment import environment, machine
from bench.loadgen.loops import Target
from bench.loadgen.progress import ProgressLine
from bench.loadgen.runner import RunConfig, StepDriver, request_tensors
from bench.loadgen.server_info import ServerInfo
from bench.loadgen.sweep import parse_concurrency
from bench.loadgen.wire import infer_request_bytes
from bench.loadgen.workers import WorkerPool
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section, section_header
from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc

SECTION = "## Routing and shadowing overhead"
MODEL = "mlp_classifier"


@dataclass(frozen=True)
class Scenario:
    key: str
    label: str
    shadow_fraction: float | None  # None: no shadow
    routed: bool = True


SCENARIOS = (
    Scenario("none", "(a) no routing table", None, routed=False),
    Scenario("ab", "(b) A/B 50/50 (v1, v2)", None),
    Scenario("ab+shadow100", "(c) A/B + shadow to v2, fraction 1.0", 1.0),
    Scenario("ab+shadow10", "(d) A/B + shadow to v2, fraction 0.1", 0.1),
)


# -- the repository and the tables ----------------------------------------------------------


def prepare_repository(root: Path) -> Path:
    """The example model with both versions, version policy ``all``, the comparison's ONNX
    Runtime settings (one intra-op thread, no spinning) and the example's batching."""
    examples = ensure_examples([MODEL])
    model_dir = root / MODEL
    shutil.copytree(examples / MODEL, model_dir)
    config = model_dir / "config.pbtxt"
    text, count = re.subn(r"^version_policy\s*:.*$", "version_policy: { all { } }",
                          config.read_text(encoding="utf-8"), flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"{config}: expected one version_policy line to rewrite")
    config.write_text(set_parameters(text, ORT_PARAMETERS), encoding="utf-8")
    versions = sorted(p.name for p in model_dir.iterdir() if p.name.isdigit())
    if versions[:2] != ["1", "2"]:
        raise RuntimeError(f"{model_dir}: expected versions 1 and 2, found {versions}")
    return model_dir


def table_of(scenario: Scenario) -> admin.RouteTable | None:
    if not scenario.routed:
        return None
    table = admin.RouteTable(model=MODEL, variants=[
        admin.Variant(name="a", version="1", weight=50.0),
        admin.Variant(name="b", version="2", weight=50.0),
    ])
    if scenario.shadow_fraction is not None:
        table.shadow.CopyFrom(admin.Shadow(
            target=admin.Variant(name="shadow", version="2"),
            fraction=scenario.shadow_fraction,
        ))
    return table


class Admin:
    """The server's PeregrineAdmin service: one table at a time for :data:`MODEL`."""

    def __init__(self, url: str) -> None:
        self._channel = grpc.insecure_channel(url)
        self._stub = admin_grpc.PeregrineAdminStub(self._channel)
        self._routed = False

    def apply(self, scenario: Scenario) -> None:
        """Clear the table in force (its shadow's queue and counters go with it), then set
        the scenario's."""
        if self._routed:
            self._stub.ClearRoute(admin.RouteRequest(model=MODEL), timeout=10)
            self._routed = False
        table = table_of(scenario)
        if table is not None:
            self._stub.SetRoute(admin.SetRouteRequest(table=table), timeout=10)
            self._routed = True

    def figures(self) -> dict[str, Any] | None:
        """Requests per variant and the shadow's counters of the table in force."""
        if not self._routed:
            return None
        status = self._stub.GetRoute(admin.RouteRequest(model=MODEL), timeout=10)
        figures: dict[str, Any] = {
            "variant_requests": {v.name: int(v.requests) for v in status.variants},
            "variant_errors": {v.name: int(v.errors) for v in status.variants},
        }
        if status.HasField("shadow"):
            shadow = status.shadow
            figures["shadow"] = {
                "mirrored": int(shadow.mirrored), "dropped": int(shadow.dropped),
                "failed": int(shadow.failed), "compared": int(shadow.compared),
                "agreement": round(shadow.agreement, 6),
                "max_abs_diff": shadow.max_abs_diff, "mean_abs_diff": shadow.mean_abs_diff,
            }
        return figures

    def close(self) -> None:
        self._channel.close()


# -- the measurement ------------------------------------------------------------------------


def step_figures(step: dict[str, Any]) -> dict[str, Any]:
    """The headline figures of one step record of bench/loadgen/runner.py (no histogram)."""
    latency = step["latency_ms"]
    server_cpu = step["server_cpu"] or {}
    return {
        "throughput_rps": round(step["throughput_rps"], 1),
        "p50_ms": round(latency["p50"], 3),
        "p99_ms": round(latency["p99"], 3),
        "p99_9_ms": round(latency["p99.9"], 3),
        "ok": step["ok"],
        "errors": step["errors"],
        "server_cpu_percent": round(server_cpu["percent"], 1) if server_cpu else None,
        "server_cpu_us_per_request": round(server_cpu["us_per_request"], 1)
        if server_cpu else None,
        "client_cpu_percent": round(step["client_cpu"]["percent"], 1),
        "mean_batch_rows": (step["server_split"] or {}).get("mean_batch_rows"),
        "bound": step["bound"],
    }


def measure(args: argparse.Namespace, url: str, server_pid: int) -> list[dict[str, Any]]:
    info = ServerInfo(url)
    admin_client = Admin(url)
    progress = ProgressLine(enabled=False)
    runs: list[dict[str, Any]] = []
    try:
        info.wait_ready(MODEL)
        base = RunConfig(url=url, model=MODEL, concurrency=tuple(args.concurrency),
                         duration_s=args.seconds, warmup_s=args.warmup, repeats=1,
                         server_pid=server_pid)
        tensors = request_tensors(base, info)
        payload = infer_request_bytes(MODEL, "", tensors)
        target = Target(url=url, payload=payload, rows=tensors[0].rows)
        with WorkerPool(1, target) as pool:
            for repeat in range(args.repeats):
                for rpc in args.rpc:
                    config = replace(base, rpc=rpc)
                    config.validate()
                    driver = StepDriver(config, pool, info, tensors[0].rows, progress)
                    for concurrency in args.concurrency:
                        shift = repeat % len(SCENARIOS)
                        for scenario in SCENARIOS[shift:] + SCENARIOS[:shift]:
                            admin_client.apply(scenario)
                            step = driver.run(concurrency, 0.0, repeat)
                            figures = admin_client.figures()
                            result = {"scenario": scenario.key, "rpc": rpc,
                                      "concurrency": concurrency, "repeat": repeat + 1,
                                      **step_figures(step), "route": figures}
                            runs.append(result)
                            print(progress_text(result), flush=True)
            admin_client.apply(SCENARIOS[0])
    finally:
        admin_client.close()
        info.close()
    return runs


def progress_text(run: dict[str, Any]) -> str:
    text = (f"{run['rpc']:>6} c={run['concurrency']:<3} {run['scenario']:<13} "
            f"#{run['repeat']}: {run['throughput_rps']:7.0f} infer/s, p50 {run['p50_ms']:.2f} "
            f"ms, p99 {run['p99_ms']:.2f} ms, server CPU {run['server_cpu_percent']}% "
            f"({run['server_cpu_us_per_request']} us/req), errors {sum(run['errors'].values())}")
    shadow = (run["route"] or {}).get("shadow")
    if shadow:
        text += (f"; shadow mirrored {shadow['mirrored']}, dropped {shadow['dropped']}, "
                 f"compared {shadow['compared']}")
    return text


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(np.median(present)) if present else None


def summarise(runs: list[dict[str, Any]], rpcs: Sequence[str],
              levels: Sequence[int]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for rpc in rpcs:
        for concurrency in levels:
            base: dict[str, Any] | None = None
            for scenario in SCENARIOS:
                mine = [r for r in runs if r["rpc"] == rpc and r["concurrency"] == concurrency
                        and r["scenario"] == scenario.key]
                if not mine:
                    continue
                row: dict[str, Any] = {
                    "rpc": rpc, "concurrency": concurrency, "scenario": scenario.key,
                    "label": scenario.label, "runs": len(mine),
                    "throughput_rps": round(_median([r["throughput_rps"] for r in mine])
                                            or 0.0, 1),
                    "throughput_runs": [r["throughput_rps"] for r in mine],
                    "p50_ms": round(_median([r["p50_ms"] for r in mine]) or 0.0, 3),
                    "p99_ms": round(_median([r["p99_ms"] for r in mine]) or 0.0, 3),
                    "p99_runs": [r["p99_ms"] for r in mine],
                    "server_cpu_percent": _median([r["server_cpu_percent"] for r in mine]),
                    "server_cpu_us_per_request": _median(
                        [r["server_cpu_us_per_request"] for r in mine]),
                    "client_cpu_percent": _median([r["client_cpu_percent"] for r in mine]),
                    "mean_batch_rows": _median([r["mean_batch_rows"] for r in mine]),
                    "errors": sum(sum(r["errors"].values()) for r in mine),
                }
                shadows = [r["route"]["shadow"] for r in mine
                           if r["route"] and "shadow" in r["route"]]
                if shadows:
                    primary = sum(sum(r["route"]["variant_requests"].values()) for r in mine)
                    row["shadow"] = {
                        key: sum(s[key] for s in shadows)
                        for key in ("mirrored", "dropped", "failed", "compared")
                    }
                    row["shadow"]["primary_requests"] = primary
                    row["shadow"]["mirrored_share"] = round(
                        row["shadow"]["mirrored"] / max(primary, 1), 4)
                    row["shadow"]["agreement"] = min(s["agreement"] for s in shadows)
                    row["shadow"]["max_abs_diff"] = max(s["max_abs_diff"] for s in shadows)
                if base is None:
                    base = row
                row["throughput_ratio"] = round(row["throughput_rps"]
                                                / max(base["throughput_rps"], 1e-9), 3)
                row["p99_ratio"] = round(row["p99_ms"] / max(base["p99_ms"], 1e-9), 3)
                cost, base_cost = (row["server_cpu_us_per_request"],
                                   base["server_cpu_us_per_request"])
                row["server_cpu_ratio"] = (round(cost / base_cost, 3)
                                           if cost is not None and base_cost else None)
                rows.append(row)
    return rows


# -- output ---------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = sorted({(r["rpc"], r["concurrency"]) for r in rows},
                    key=lambda g: (g[0] != "unary", g[1]))
    keys = [s.key for s in SCENARIOS]
    colours = ["tab:gray", "tab:blue", "tab:red", "tab:orange"]
    figure, axes = plt.subplots(2, len(groups), figsize=(3.6 * len(groups) + 1, 6.5),
                                squeeze=False)
    for column, (rpc, concurrency) in enumerate(groups):
        mine = {r["scenario"]: r for r in rows
                if r["rpc"] == rpc and r["concurrency"] == concurrency}
        present = [k for k in keys if k in mine]
        x = np.arange(len(present))
        for axis, value, runs_key, unit in ((axes[0][column], "throughput_rps",
                                             "throughput_runs", "infer/s"),
                                            (axes[1][column], "p99_ms", "p99_runs",
                                             "p99 ms")):
            axis.bar(x, [mine[k][value] for k in present], alpha=0.6,
                     color=[colours[keys.index(k)] for k in present])
            for i, k in enumerate(present):
                axis.scatter([i] * len(mine[k][runs_key]), mine[k][runs_key], color="black",
                             s=10, zorder=3)
            axis.set_xticks(x, present, rotation=25, fontsize=8)
            axis.set_ylabel(unit)
            axis.grid(True, axis="y", alpha=0.3)
        axes[0][column].set_title(f"{rpc}, c={concurrency}", fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _ratio(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def markdown(document: dict[str, Any]) -> str:
    env, settings = document["environment"], document["settings"]
    info = env["machine"]
    lines = [
        *section_header(SECTION, document),
        f"`peregrine serve` on CPU {settings['server_cpus']}, the load generator "
        f"(`bench/loadgen/runner.py`, one process) on CPU {settings['client_cpus']}; example "
        f"`{MODEL}` with versions 1 and 2 (version policy `all`), one ONNX Runtime intra-op "
        "thread, spinning off, the example's dynamic batching; batch-1 requests naming no "
        f"version, closed loop; {settings['warmup_s']} s warm-up then {settings['seconds']} s "
        f"measured per step; every scenario run {settings['repeats']} times per RPC and "
        "concurrency in rotating order, medians below (ratios are against (a) at the same RPC "
        "and concurrency). Tables set through PeregrineAdmin.SetRoute, cleared and set afresh "
        "before each step: (a) none, the version policy's latest (v2) answers; (b) "
        "`a=1:50 b=2:50`; (c) (b) + `shadow=2` with fraction 1.0; (d) the same with "
        "fraction 0.1. Shadow counters from GetRoute after each step, summed over the "
        "repeats (they include the warm-up).",
        "",
        "| RPC | c | scenario | infer/s | vs (a) | p50 ms | p99 ms | p99 vs (a) | server CPU % "
        "| server CPU µs/request | vs (a) | mean batch rows | shadow mirrored / dropped / compared "
        "(share of primary) | infer/s per run |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for r in document["rows"]:
        shadow = r.get("shadow")
        shadow_text = (f"{shadow['mirrored']} / {shadow['dropped']} / {shadow['compared']} "
                       f"({shadow['mirrored_share']:.0%})" if shadow else "—")
        cpu = r["server_cpu_percent"]
        cost = r["server_cpu_us_per_request"]
        batch = r["mean_batch_rows"]
        lines.append(
            f"| {r['rpc']} | {r['concurrency']} | {r['label']} | {r['throughput_rps']:.0f} "
            f"| {_ratio(r['throughput_ratio'])} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} "
            f"| {_ratio(r['p99_ratio'])} | {'—' if cpu is None else f'{cpu:.0f}'} "
            f"| {'—' if cost is None else f'{cost:.0f}'} | {_ratio(r['server_cpu_ratio'])} "
            f"| {'—' if batch is None else f'{batch:.1f}'} | {shadow_text} "
            f"| {', '.join(f'{t:.0f}' for t in r['throughput_runs'])} |"
        )
    errors = sum(r["errors"] for r in document["rows"])
    shadows = [r["shadow"] for r in document["rows"] if r.get("shadow")]
    clean = [s["agreement"] for s in shadows if not s["dropped"]]
    dropping = [s["agreement"] for s in shadows if s["dropped"]]

    def span(values: list[float]) -> str:
        return f"{min(values):.2f}-{max(values):.2f}" if values else "n/a"

    lines += [
        "",
        f"Failed requests in the whole run: {errors}. Mean batch rows: executions of every "
        "version, shadow copies included (ModelStatistics deltas). The shadow is a task on "
        "the server's event loop that submits each copy to version 2's scheduler, on the same "
        "core as the primary traffic by design: a copy costs the model's share of a request "
        "(queueing, batching, the session run, the comparison) but no gRPC parsing or "
        "encoding, and it may share a batch with primary requests. Copies wait in a queue of "
        "at most 256 (the default max_pending) and are dropped when it is full; the callers never "
        "wait for them.",
        "",
        "Shadow agreement (share of compared copies whose class output matched the "
        "primary's): the generator sends one fixed request, and on it the two versions' classes "
        "differ (they did here), so agreement is the share of compared copies whose primary "
        f"was version 2: {span(clean)} when nothing was dropped, {span(dropping)} with drops "
        "(the copies that survive a full queue are not a uniform sample of the traffic).",
        "",
        f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} and "
        f"{document['loadavg'][1]:.2f} on {info['nproc']} CPUs (the server and the generator "
        "account for up to ~2). Repeats differ by ±3-10 % on this machine (bench/README.md, "
        "noise): treat ratios within ~0.9-1.1 as no change.",
        "",
        "![routing overhead](results/routing_overhead.png) · "
        "data: [results/routing_overhead.json](results/routing_overhead.json)",
        "",
    ]
    return "\n".join(lines)


# -- main -----------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per step")
    parser.add_argument("--warmup", type=float, default=0.5,
                        help="unmeasured seconds before each step")
    parser.add_argument("--repeats", type=int, default=3, help="runs per scenario")
    parser.add_argument("--concurrency", default="8,32", help="requests in flight, e.g. 8,32")
    parser.add_argument("--rpc", default="unary,stream", help="unary, stream or both")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list of the server")
    parser.add_argument("--client-cpus", default="1", help="CPUs of the load generator")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "routing_overhead.json")
    parser.add_argument("--no-results-md", action="store_true",
                        help="do not update bench/RESULTS.md")
    args = parser.parse_args(argv)
    args.concurrency = parse_concurrency(args.concurrency)
    args.rpc = [r for r in args.rpc.split(",") if r]
    if not args.rpc or any(r not in ("unary", "stream") for r in args.rpc):
        parser.error("--rpc takes unary, stream or unary,stream")
    if args.repeats < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--repeats >= 1, --seconds > 0, --warmup >= 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.studies.routing_overhead",
                          *(argv if argv is not None else sys.argv[1:])])
    multi_cpu = len(os.sched_getaffinity(0)) > 1
    this_machine = machine()  # before pinning: nproc counts the CPUs we may use
    load_at_start = os.getloadavg()[0]
    server_cpus = args.server_cpus if multi_cpu else None
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="routing-overhead-") as tmp:
        root = Path(tmp) / "models"
        root.mkdir()
        prepare_repository(root)
        with PeregrineProcess(root, cpus=server_cpus, name="peregrine-routing") as server:
            # The generator processes are spawned from here and inherit this pinning.
            client_cpus = pin_self(args.client_cpus) if multi_cpu else sorted(
                os.sched_getaffinity(0))
            runs = measure(args, server.url, server.pid)
            env = {**environment(server.pid), "machine": this_machine}
    rows = summarise(runs, args.rpc, args.concurrency)
    document = {
        "kind": "routing_overhead",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {
            "model": MODEL, "rpcs": args.rpc, "concurrency": args.concurrency,
            "seconds": args.seconds, "warmup_s": args.warmup, "repeats": args.repeats,
            "server_cpus": server_cpus or "any", "client_cpus": ",".join(map(str, client_cpus)),
            "ort_parameters": dict(ORT_PARAMETERS),
            "scenarios": {s.key: s.label for s in SCENARIOS},
        },
        "environment": env,
        "loadavg": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "elapsed_s": round(time.monotonic() - started, 1),
        "rows": rows,
        "runs": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    png = args.out.with_suffix(".png")
    plot(rows, png, f"{MODEL}: routing and shadowing overhead, closed loop (medians of "
                    f"{args.repeats}; git {env['git_revision'][:12]})")
    if not args.no_results_md:
        replace_section(markdown(document))
    for r in rows:
        shadow = r.get("shadow")
        print(f"{r['rpc']:>6} c={r['concurrency']:<3} {r['scenario']:<13} "
              f"{r['throughput_rps']:7.0f} infer/s (x{r['throughput_ratio']:.2f}), "
              f"p99 {r['p99_ms']:.2f} ms (x{r['p99_ratio']:.2f}), server "
              f"{r['server_cpu_us_per_request']} us/req"
              + (f", shadow {shadow}" if shadow else ""))
    print(f"{document['elapsed_s']} s; wrote {args.out}, {png}"
          + ("" if args.no_results_md else f", {RESULTS_MD}"))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
