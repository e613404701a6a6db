"""Overload: open-loop load at a multiple of what the server sustains, then back to half.

The issue's goal: at 4x the sustained rate, the requests the server accepts keep their p99
within 2x of the unloaded p99, the excess is refused (RESOURCE_EXHAUSTED) within 1 ms at the
server, RSS stays bounded, and throughput is back to normal within a second of the load
dropping.

One ``peregrine serve`` subprocess per configuration (pinned to CPU 0 with ``taskset``)
serves the latest example ``mlp_classifier`` with the comparison's settings (one ONNX Runtime
intra-op thread, spinning off, the example's dynamic batching). This process is pinned to
CPU 1. Per configuration (``--configs``: the server flags of each, ``;`` between them; an
empty one is the defaults):

1. **sustained rate** S: closed loop of ``--concurrency`` unary requests in flight through
   the load generator (``bench/loadgen``), with the server's CPU per request;
2. **refusal capacity**: the same closed loop of requests refused at once (a tensor shape
   past --max-tensor-elements, refused from the parsed shape before the model is looked up
   or anything allocated): how many refusals per second the server's core can give, and
   its CPU per refusal;
3. **the timeline**: open loop (Poisson) at ``--base-share`` x S (the unloaded phase), then
   ``--factor`` x S, then ``--base-share`` x S again, every request recorded
   (``bench/studies/timeline.py``), the server's RSS and CPU sampled every 100 ms.

The rates of every configuration come from the first configuration's S (so they are
comparable). Figures per configuration: the unloaded p99 (answers to requests scheduled in
the first phase), the accepted p99 of the overload phase against it, refusals and how long
they took as the client saw them (from the scheduled send to the status: an upper bound of
the time at the server, transport and the wait for the server's event loop included),
other failures by status, the RSS over time, and the recovery: the time from the load drop
to the first 100 ms bin from which, to the end of the run, answers arrive at >= 90 % of the
unloaded phase's rate (300 ms rolling mean), nothing fails, and the bin's p99 is within 2x
of the unloaded p99.

Results: ``bench/results/overload.json``, ``overload.png`` (per-100 ms throughput, refusals,
p99, server CPU and RSS) and the "Overload" section of ``bench/RESULTS.md``::

    .venv/bin/python -m bench.studies.overload [--configs ';--grpc-max-pending-calls 16']
        [--factor 4] [--model mlp_classifier]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.compare.servers import PeregrineProcess
from bench.loadgen.inputs import InputTensor
from bench.loadgen.loops import Target
from bench.loadgen.progress import ProgressLine
from bench.loadgen.runner import RunConfig, StepDriver, request_tensors
from bench.loadgen.server_info import ServerInfo
from bench.loadgen.wire import infer_request_bytes
from bench.loadgen.workers import WorkerPool
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section, section_header
from bench.studies.rss import MIB, ProcessSampler
from bench.studies.study_run import start_study
from bench.studies.timeline import OK, Phase, Timeline, run_phases
from tests.model_factory import chain_model

SECTION = "## Overload"
DEFAULT_MODEL = "mlp_classifier"
#: ``--model chain``: a model bound by its own work (tests/model_factory.py's chain of Sin over
#: CHAIN_VALUES values a request, a few ms of one core whatever the batch), where the example
#: MLP is bound by the frontend's per-call work. Its sustained rate is low enough for this
#: process to offer 4x it, which the MLP's is not.
CHAIN = "chain"
CHAIN_VALUES = 4096
CHAIN_STEPS = 400
BIN_NS = 100_000_000
#: Bins (1 s) that must all be normal for the load to count as recovered.
STEADY_BINS = 10
#: Refusals: a bound's in Python, or gRPC's core cancelling a call past
#: --grpc-max-pending-calls (this client never cancels a call itself).
REFUSED = ("RESOURCE_EXHAUSTED", "CANCELLED")
#: A tensor shape past the default --max-tensor-elements (the message carries no data).
REFUSED_SHAPE = (1, 1 << 27)


@dataclass(frozen=True)
class Capacity:
    """A closed-loop step's rate (answers or refusals per second) and server CPU per call."""

    rate: float
    server_cpu_percent: float
    server_us_per_call: float
    p99_ms: float


# -- measuring ------------------------------------------------------------------------------


def label(flags: list[str]) -> str:
    return " ".join(flags) or "defaults"


def closed_loop(url: str, pid: int, payload: bytes, args: argparse.Namespace, *,
                refusals: bool) -> Capacity:
    """``args.concurrency`` requests of ``payload`` in flight for ``args.sustain_seconds``;
    the rate counts the answers, and the refusals too when ``refusals``."""
    info = ServerInfo(url)
    try:
        config = RunConfig(url=url, model=args.model, concurrency=(args.concurrency,),
                           duration_s=args.sustain_seconds, warmup_s=1.0, server_pid=pid)
        with WorkerPool(1, Target(url=url, payload=payload, rows=1)) as pool:
            step = StepDriver(config, pool, info, 1, ProgressLine(enabled=False)).run(
                args.concurrency, 0.0, 0)
    finally:
        info.close()
    answers = step["ok"] + (sum(step["errors"].values()) if refusals else 0)
    rate = answers / step["window_s"]
    cpu = step["server_cpu"]["percent"]
    return Capacity(round(rate, 1), round(cpu, 1), round(1e4 * cpu / max(rate, 1e-9), 1),
                    round(step["latency_ms"]["p99"], 3))


def payloads(url: str, model: str) -> tuple[bytes, bytes]:
    """The model's request (random batch-1 input) and one refused by a cap at once."""
    info = ServerInfo(url)
    try:
        info.wait_ready(model)
        tensors = request_tensors(RunConfig(url=url, model=model, dynamic_dim=CHAIN_VALUES),
                                  info)
    finally:
        info.close()
    refused = [InputTensor(t.name, t.datatype, REFUSED_SHAPE, b"") for t in tensors]
    return infer_request_bytes(model, "", tensors), infer_request_bytes(model, "", refused)


def phases(sustained: float, args: argparse.Namespace) -> list[Phase]:
    base = args.base_share * sustained
    return [Phase("warm-up", base, args.warmup), Phase("unloaded", base, args.before),
            Phase("overload", args.factor * sustained, args.over),
            Phase("after", base, args.after)]


def run_configuration(root: Path, flags: list[str], sustained: float | None,
                      server_cpus: str | None, args: argparse.Namespace) -> dict[str, Any]:
    with PeregrineProcess(root, cpus=server_cpus, name="peregrine-overload",
                          extra_args=flags) as server:
        payload, refused = payloads(server.url, args.model)
        capacity = closed_loop(server.url, server.pid, payload, args, refusals=False)
        refusal = closed_loop(server.url, server.pid, refused, args, refusals=True)
        rates_from = sustained if sustained is not None else capacity.rate
        plan = phases(rates_from, args)
        with ProcessSampler(server.pid) as sampler:
            timeline = asyncio.run(run_phases(server.url, payload, plan, seed=args.seed,
                                              timeout_s=args.timeout))
    result = {"label": label(flags), "flags": flags, "sustained": capacity.__dict__,
              "refusal": refusal.__dict__, "rates_from": rates_from,
              "phases": [{"name": p.name, "rate": round(p.rate, 1), "seconds": p.seconds}
                         for p in plan]}
    result.update(figures(timeline, sampler))
    return result


# -- figures --------------------------------------------------------------------------------


def _p(values: npt.NDArray[np.float64], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 3) if values.size else None


def figures(timeline: Timeline, sampler: ProcessSampler) -> dict[str, Any]:
    """Per-phase figures, the 100 ms bins, the recovery time and the RSS."""
    cols = timeline.arrays()
    code = np.array(timeline.code)
    latency_ms = (cols["done"] - cols["scheduled"]) / 1e6
    lag_ms = (cols["sent"] - cols["scheduled"]) / 1e6
    ok = code == OK
    refused = np.isin(code, REFUSED)
    bounds = {name: (start, end) for name, _, start, end in timeline.phases}
    origin = bounds["unloaded"][0]
    per_phase: dict[str, Any] = {}
    for name, rate, start, end in timeline.phases:
        mine = (cols["scheduled"] >= start) & (cols["scheduled"] < end)
        others: dict[str, int] = {}
        for c in code[mine & ~ok & ~refused]:
            others[str(c)] = others.get(str(c), 0) + 1
        per_phase[name] = {
            "offered_rate": round(rate, 1),
            "requests": int(mine.sum()), "ok": int((mine & ok).sum()),
            "refused": int((mine & refused).sum()), "other_errors": others,
            "ok_p50_ms": _p(latency_ms[mine & ok], 50), "ok_p99_ms": _p(latency_ms[mine & ok], 99),
            "ok_max_ms": _p(latency_ms[mine & ok], 100),
            "refused_p50_ms": _p(latency_ms[mine & refused], 50),
            "refused_p99_ms": _p(latency_ms[mine & refused], 99),
            "refused_max_ms": _p(latency_ms[mine & refused], 100),
            "send_lag_p99_ms": _p(lag_ms[mine], 99),
            "sent_rate": round(float(mine.sum()) / ((end - start) / 1e9), 1),
            "server_cpu_percent": _cpu_percent(sampler, start, end),
            "rss_peak_mib": round(sampler.peak(start, end) / MIB, 1),
        }
    unloaded_p99 = per_phase["unloaded"]["ok_p99_ms"]
    over_p99 = per_phase["overload"]["ok_p99_ms"]
    bins = timeline_bins(cols["done"], cols["scheduled"], latency_ms, ok, refused, origin,
                         sampler)
    drop = bounds["after"][0]
    return {
        "per_phase": per_phase,
        "unloaded_p99_ms": unloaded_p99,
        "overload_ok_p99_ms": over_p99,
        "p99_ratio": round(over_p99 / unloaded_p99, 2) if over_p99 and unloaded_p99 else None,
        "refusal_details": timeline.details,
        "rss_mib": {"start": round(sampler.samples[0].rss / MIB, 1),
                    "peak": round(sampler.peak() / MIB, 1),
                    "end": round(sampler.samples[-1].rss / MIB, 1)},
        "recovery_s": recovery_s(bins, (drop - origin) / 1e9, unloaded_p99),
        "bins": bins,
    }


def _cpu_percent(sampler: ProcessSampler, start: int, end: int) -> float | None:
    inside = [s for s in sampler.samples if start <= s.at_ns <= end]
    if len(inside) < 2:
        return None
    first, last = inside[0], inside[-1]
    return round(100 * (last.cpu_s - first.cpu_s) / ((last.at_ns - first.at_ns) / 1e9), 1)


def timeline_bins(done: npt.NDArray[np.int64], scheduled: npt.NDArray[np.int64],
                  latency_ms: npt.NDArray[np.float64], ok: npt.NDArray[np.bool_],
                  refused: npt.NDArray[np.bool_], origin: int,
                  sampler: ProcessSampler) -> dict[str, list[float | None]]:
    """Per 100 ms of answer time from the start of the unloaded phase: answers/s, refusals/s,
    other failures/s, the p99 of the answers, the server's CPU % and RSS (MiB); and the
    requests/s scheduled in the same 100 ms."""
    index = (done - origin) // BIN_NS
    offered = (scheduled - origin) // BIN_NS
    count = int(index.max()) + 1 if index.size else 0
    bins: dict[str, list[float | None]] = {k: [] for k in (
        "t_s", "offered_per_s", "ok_per_s", "refused_per_s", "failed_per_s", "ok_p99_ms",
        "cpu_percent", "rss_mib")}
    for b in range(max(count, 0)):
        here = index == b
        lo, hi = origin + b * BIN_NS, origin + (b + 1) * BIN_NS
        bins["t_s"].append(round(b * BIN_NS / 1e9, 1))
        bins["offered_per_s"].append(float((offered == b).sum()) * 1e9 / BIN_NS)
        bins["ok_per_s"].append(float((here & ok).sum()) * 1e9 / BIN_NS)
        bins["refused_per_s"].append(float((here & refused).sum()) * 1e9 / BIN_NS)
        bins["failed_per_s"].append(float((here & ~ok & ~refused).sum()) * 1e9 / BIN_NS)
        bins["ok_p99_ms"].append(_p(latency_ms[here & ok], 99))
        bins["cpu_percent"].append(_cpu_percent(sampler, lo - BIN_NS // 2, hi + BIN_NS // 2))
        bins["rss_mib"].append(round(sampler.peak(lo, hi) / MIB, 1) or None)
    return bins


def recovery_s(bins: dict[str, list[float | None]], drop_s: float,
               unloaded_p99_ms: float | None) -> float | None:
    """Seconds from the load drop to the first bin from which a whole second of bins (or all
    the rest, when fewer are left) is normal: answers at >= 90 % of the requests scheduled
    over the 300 ms around the bin (the offered load's own randomness cancels out), no failure
    and no refusal, the p99 within 2x the unloaded p99. None when it never gets there. (A
    refusal in a burst of the normal load later on is not a failure to recover: it happens in
    the unloaded phase as well, and the phase's figures count it.)"""
    if unloaded_p99_ms is None:
        return None
    t, rate = bins["t_s"], bins["ok_per_s"]
    first = next((i for i, at in enumerate(t) if at is not None and at >= drop_s), None)
    if first is None:
        return None
    last = len(t) - 1  # the last bin holds the final answers only: not a full 100 ms
    normal = []
    for i in range(first, last):
        answered = sum(r or 0.0 for r in rate[max(first, i - 1):i + 2])
        offered = sum(r or 0.0 for r in bins["offered_per_s"][max(first, i - 1):i + 2])
        p99 = bins["ok_p99_ms"][i]
        normal.append(answered >= 0.9 * offered
                      and not bins["failed_per_s"][i] and not bins["refused_per_s"][i]
                      and p99 is not None and p99 <= 2 * unloaded_p99_ms)
    for k in range(len(normal)):
        if all(normal[k:k + STEADY_BINS]):
            return round(float(t[first + k] or 0.0) - drop_s + 0.1, 1) if k else 0.0
    return None


# -- output ---------------------------------------------------------------------------------


def plot(document: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = document["configurations"]
    figure, axes = plt.subplots(4, len(runs), figsize=(5.5 * len(runs), 9), sharex="col",
                                squeeze=False)
    for column, run in enumerate(runs):
        bins = run["bins"]
        t = bins["t_s"]
        edges = np.cumsum([0.0] + [p["seconds"] for p in run["phases"][1:]])
        top = axes[0][column]
        top.plot(t, bins["ok_per_s"], label="answers/s", color="tab:blue")
        top.plot(t, bins["refused_per_s"], label="refused/s", color="tab:red")
        top.plot(t, bins["failed_per_s"], label="other failures/s", color="tab:gray")
        top.set_ylabel("per second")
        top.legend(fontsize=7)
        top.set_title(run["label"], fontsize=9)
        lat = axes[1][column]
        lat.plot(t, [v if v is not None else np.nan for v in bins["ok_p99_ms"]],
                 color="tab:blue")
        if run["unloaded_p99_ms"]:
            lat.axhline(2 * run["unloaded_p99_ms"], color="tab:green", linestyle="--",
                        label="2x unloaded p99")
            lat.legend(fontsize=7)
        lat.set_yscale("log")
        lat.set_ylabel("answers' p99 ms")
        axes[2][column].plot(t, [v if v is not None else np.nan for v in bins["cpu_percent"]],
                             color="tab:orange")
        axes[2][column].set_ylabel("server CPU %")
        axes[3][column].plot(t, [v if v is not None else np.nan for v in bins["rss_mib"]],
                             color="tab:purple")
        axes[3][column].set_ylabel("server RSS MiB")
        axes[3][column].set_xlabel("seconds (answer time)")
        for axis in axes[:, column]:
            for edge in edges[1:-1]:
                axis.axvline(edge, color="black", alpha=0.3)
            axis.grid(True, alpha=0.3)
    settings = document["settings"]
    figure.suptitle(f"{settings['model']}: open loop at {settings['base_share']}x, "
                    f"{settings['factor']}x, {settings['base_share']}x"
                    " the sustained rate (100 ms bins)", fontsize=10)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:,.2f}"


def section_heading(model: str) -> str:
    return SECTION if model == DEFAULT_MODEL else f"{SECTION} ({model})"


def markdown(document: dict[str, Any]) -> str:
    s = document["settings"]
    lines = [
        *section_header(section_heading(s["model"]), document),
        f"`peregrine serve` on CPU {s['server_cpus']}, this process (the load) on CPU "
        f"{s['client_cpus']}; latest example `{s['model']}`, one ONNX Runtime intra-op thread, "
        "spinning off, the example's dynamic batching; batch-1 unary requests. Sustained "
        f"rate S: closed loop, {s['concurrency']} in flight, {s['sustain_seconds']} s. Then "
        f"open loop (Poisson): {s['before']} s at {s['base_share']} S (the unloaded p99), "
        f"{s['over']} s at {s['factor']} S, {s['after']} s at {s['base_share']} S, after "
        f"{s['warmup']} s of warm-up; rates from the first configuration's S. Latency runs "
        "from the scheduled send. 'Refused' is RESOURCE_EXHAUSTED (a bound in Python) or "
        "CANCELLED (gRPC's core, past --grpc-max-pending-calls); its time is what the client "
        "saw, from the scheduled send to the status (an upper bound of the time at the "
        "server). The load comes from one Python process on one core: where its send lag "
        "(scheduled to sent, p99 in the JSON) grows, part of the latency is the client's. "
        "Refusal capacity: the same closed loop of requests refused at once by a "
        "cap (a shape past --max-tensor-elements, refused from the parsed shape).",
        "",
        "| server flags | S infer/s (server µs/answer) | refusals/s at saturation "
        "(server µs/refusal) | unloaded p99 ms | overload: offered / sent per s | answered "
        "| accepted p99 ms (x unloaded) | refused (client-seen p50 / p99 ms) | other failures "
        "| RSS start / peak / end MiB | recovery s | client's send lag p99 ms (overload) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for run in document["configurations"]:
        over = run["per_phase"]["overload"]
        others = ", ".join(f"{k} {v}" for k, v in over["other_errors"].items()) or "0"
        ratio = "—" if run["p99_ratio"] is None else f"{run['p99_ratio']:.1f}"
        rss = run["rss_mib"]
        recovery = "never" if run["recovery_s"] is None else f"{run['recovery_s']:.1f}"
        lines.append(
            f"| {run['label']} "
            f"| {run['sustained']['rate']:,.0f} ({run['sustained']['server_us_per_call']:.0f}) "
            f"| {run['refusal']['rate']:,.0f} ({run['refusal']['server_us_per_call']:.0f}) "
            f"| {_ms(run['unloaded_p99_ms'])} "
            f"| {over['offered_rate']:,.0f} / {over['sent_rate']:,.0f} | {over['ok']:,} "
            f"| {_ms(run['overload_ok_p99_ms'])} ({ratio}) "
            f"| {over['refused']:,} ({_ms(over['refused_p50_ms'])} / "
            f"{_ms(over['refused_p99_ms'])}) | {others} "
            f"| {rss['start']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f} | {recovery} "
            f"| {_ms(over['send_lag_p99_ms'])} |")
    lines += ["", *document["findings"], "",
              f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} and "
              f"{document['loadavg'][1]:.2f} on {document['environment']['machine']['nproc']} "
              "CPUs shared with other work: every figure here moves with it.", "",
              f"![overload](results/{document['out']}.png) · data: "
              f"[results/{document['out']}.json](results/{document['out']}.json)", ""]
    return "\n".join(lines)


def findings(runs: list[dict[str, Any]]) -> list[str]:
    """What the figures say, computed (not written by hand) so a rerun keeps it true."""
    lines = []
    for run in runs:
        s, r = run["sustained"], run["refusal"]
        over = run["per_phase"]["overload"]
        excess = max(over["sent_rate"] - s["rate"], 0.0)
        # A core's share to answer S and refuse the rest (CPU µs per call from the closed loops).
        need = (min(over["sent_rate"], s["rate"]) * s["server_us_per_call"]
                + excess * r["server_us_per_call"]) / 1e4
        lines.append(
            f"- {run['label']}: a refusal in Python costs the server "
            f"{r['server_us_per_call']:.0f} µs of CPU against {s['server_us_per_call']:.0f} µs "
            f"for an answer ({r['server_us_per_call'] / max(s['server_us_per_call'], 1):.2f}x). "
            f"Answering S and refusing the overload's excess ({excess:,.0f}/s) would take "
            f"{need:.0f} % of the server's core: "
            + ("more than it has, so the excess waits in gRPC's queue of calls not yet "
               "handed to the event loop, ahead of every bound in Python, where "
               "--grpc-max-pending-calls has gRPC's core cancel it." if need > 100
               else "within the core.")
            + f" In the overload phase {over['ok']:,} of {over['requests']:,} requests were "
            f"answered, {over['refused']:,} refused; the server's CPU was "
            f"{over['server_cpu_percent']} %.")
    return lines


# -- main -----------------------------------------------------------------------------------


def repository(model: str, tmp: Path) -> Path:
    """The comparison's repository of ``model``: an example, or the chain model built here."""
    source = ensure_examples([model]) if model != CHAIN else tmp / "source"
    if model == CHAIN:
        chain_model(source, CHAIN, steps=CHAIN_STEPS, max_batch_size=64)
    return comparison_repository(source, tmp / "models", [model], batching=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--configs", default=";--grpc-max-pending-calls 16",
                        help="server flags of each configuration, ';' between them (an empty "
                             "one: the defaults)")
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help=f"an example model, or '{CHAIN}' (bound by its own work)")
    parser.add_argument("--factor", type=float, default=4.0, help="overload, x sustained")
    parser.add_argument("--base-share", type=float, default=0.5,
                        help="the unloaded and after phases, x sustained")
    parser.add_argument("--concurrency", type=int, default=64,
                        help="closed loop of the sustained rate")
    parser.add_argument("--sustain-seconds", type=float, default=4.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--before", type=float, default=4.0, help="unloaded phase, s")
    parser.add_argument("--over", type=float, default=5.0, help="overload phase, s")
    parser.add_argument("--after", type=float, default=5.0, help="phase after the drop, s")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline, s")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--out", type=Path, default=None,
                        help="default: bench/results/overload.json (overload_<model>.json "
                             "for another model)")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    args.configs = [config.split() for config in args.configs.split(";")]
    if args.out is None:
        suffix = "" if args.model == DEFAULT_MODEL else f"_{args.model}"
        args.out = RESULTS_DIR / f"overload{suffix}.json"
    if args.factor <= 0 or args.base_share <= 0:
        parser.error("--factor and --base-share must be > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = start_study("bench.studies.overload", argv, args.server_cpus, args.client_cpus)
    server_cpus = study.server_cpus
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="overload-") as tmp:
        root = repository(args.model, Path(tmp))
        for flags in args.configs:
            run = run_configuration(root, flags, runs[0]["sustained"]["rate"] if runs
                                    else None, server_cpus, args)
            runs.append(run)
            over = run["per_phase"]["overload"]
            print(f"{run['label']}: S {run['sustained']['rate']:.0f}/s, refusals "
                  f"{run['refusal']['rate']:.0f}/s; unloaded p99 {run['unloaded_p99_ms']} ms, "
                  f"overload p99 {run['overload_ok_p99_ms']} ms (x{run['p99_ratio']}), ok "
                  f"{over['ok']}, refused {over['refused']} (p99 {over['refused_p99_ms']} ms), "
                  f"other {over['other_errors']}, RSS {run['rss_mib']}, recovery "
                  f"{run['recovery_s']} s", flush=True)
    document = {
        "kind": "overload",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **study.record(),
        "settings": {
            "model": args.model, "configs": args.configs, "factor": args.factor,
            "base_share": args.base_share, "concurrency": args.concurrency,
            "sustain_seconds": args.sustain_seconds, "warmup": args.warmup,
            "before": args.before, "over": args.over, "after": args.after,
            "timeout_s": args.timeout, **study.pinning,
        },
        "out": args.out.stem,
        "findings": findings(runs),
        "configurations": runs,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    png = args.out.with_suffix(".png")
    plot(document, png)
    if not args.no_results_md:
        replace_section(markdown(document))
    print(f"{document['elapsed_s']} s; wrote {args.out}, {png}"
          + ("" if args.no_results_md else f", {RESULTS_MD}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
