"""Hot swap under load: latency and throughput before, during and after version swaps.

A ``peregrine serve`` subprocess (poll mode, pinned to CPU 0 with ``taskset`` where there is
one) serves the example ``mlp_classifier`` from a temporary repository whose version policy
is ``latest 1``. This process, pinned to CPU 1, keeps a closed loop of unary requests in
flight (``--concurrency``) and records every request: send and answer instants, the version
that answered, the error if any. After the ``before`` phase it publishes ``--swaps`` new
versions ``--interval`` seconds apart, each written into a dot-prefixed directory inside the
model directory and renamed into place (the atomic way to publish); the server loads each one
beside the serving one, warms it, moves traffic, drains and unloads the old one. Then comes
the ``after`` phase.

Per phase: requests, failed requests, throughput, latency percentiles and the CPU used by
the server and by this client. Results: ``bench/results/swap_under_load.json``, a PNG of
latency over time with the swap instants marked, and the "Hot swap under load" section of
``bench/RESULTS.md`` (replaced in place; other sections are left alone)::

    .venv/bin/python -m bench.studies.swap_under_load [--concurrency 8] [--swaps 5] [--interval 2]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import itertools
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from tritonclient.grpc import service_pb2 as pb

from bench.compare.model_repo import ensure_examples
from bench.compare.servers import PeregrineProcess
from bench.loadgen.cpu import pin_self, self_cpu_s, tree_cpu_s
from bench.loadgen.environment import environment, machine
from bench.loadgen.histogram import LatencyHistogram
from bench.loadgen.inputs import InputTensor
from bench.loadgen.wire import channel_options, infer_request_bytes, unary_callable
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section

SECTION = "## Hot swap under load"
MODEL = "mlp_classifier"
PHASES = ("before", "during", "after")


@dataclass(slots=True)
class Record:
    """Every request of the run, column-wise (monotonic nanoseconds)."""

    sent: list[int] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    version: list[int] = field(default_factory=list)  # 0 when the request failed
    error: list[str] = field(default_factory=list)  # "" when it succeeded


@dataclass(slots=True)
class Swap:
    version: int
    published_ns: int
    first_answer_ns: int | None = None  # first answer from the new version
    last_old_answer_ns: int | None = None  # last answer from the version it replaced


# -- the repository --------------------------------------------------------------------------


def prepare_repository(root: Path) -> tuple[Path, int, list[Path]]:
    """A copy of the example model with the ``latest 1`` policy; returns it, its serving
    version and the model files the published versions cycle through."""
    examples = ensure_examples([MODEL])
    model_dir = root / MODEL
    shutil.copytree(examples / MODEL, model_dir)
    config = model_dir / "config.pbtxt"
    text, count = re.subn(r"version_policy\s*:\s*\{[^\n]*\}\s*\}",
                          "version_policy: { latest { num_versions: 1 } }",
                          config.read_text())
    if count != 1:
        raise RuntimeError(f"{config}: expected one version_policy line to rewrite")
    config.write_text(text)
    sources = sorted(model_dir.glob("[0-9]*/model.onnx"))
    staged = root / ".sources"
    staged.mkdir()
    kept = []
    for source in sources:
        copy = staged / f"v{source.parent.name}.onnx"
        shutil.copyfile(source, copy)
        kept.append(copy)
    return model_dir, max(int(p.parent.name) for p in sources), kept


def publish(model_dir: Path, version: int, model_file: Path) -> None:
    """Write the version under a dot-prefixed name (ignored by the server), then rename it."""
    staging = Path(tempfile.mkdtemp(prefix=f".publish-{version}-", dir=model_dir))
    shutil.copyfile(model_file, staging / "model.onnx")
    os.rename(staging, model_dir / str(version))


# -- load ------------------------------------------------------------------------------------


class ClosedLoop:
    def __init__(self, url: str, concurrency: int, timeout_s: float) -> None:
        rng = np.random.default_rng(0)
        digits = rng.integers(0, 17, size=(1, 64)).astype(np.float32)
        self.payload = infer_request_bytes(
            MODEL, "", [InputTensor("input", "FP32", (1, 64), digits.tobytes())]
        )
        self.url = url
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.record = Record()
        self._stop = asyncio.Event()
        self._answered: dict[int, asyncio.Event] = {}  # version -> set at its first answer
        self._tasks: list[asyncio.Task[None]] = []
        self._channel: grpc.aio.Channel | None = None

    async def start(self) -> None:
        self._channel = grpc.aio.insecure_channel(self.url, options=channel_options())
        await asyncio.wait_for(self._channel.channel_ready(), timeout=30)
        call = unary_callable(self._channel)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._slot(call)) for _ in range(self.concurrency)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        if self._channel is not None:
            await self._channel.close()

    async def answered_by(self, version: int, timeout_s: float) -> None:
        """Return once ``version`` has answered a request (or after ``timeout_s``)."""
        event = self._answered.setdefault(version, asyncio.Event())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def _slot(self, call: grpc.aio.UnaryUnaryMultiCallable) -> None:
        record, now = self.record, time.monotonic_ns
        while not self._stop.is_set():
            sent = now()
            version, error = 0, ""
            try:
                data = await call(self.payload, timeout=self.timeout_s)
                version = int(pb.ModelInferResponse.FromString(data).model_version)
            except grpc.aio.AioRpcError as exc:
                error = f"{exc.code().name}: {exc.details()}"
            except ValueError as exc:  # an answer without a numeric model_version
                error = f"BAD_RESPONSE: {exc}"
            record.sent.append(sent)
            record.answered.append(now())
            record.version.append(version)
            record.error.append(error)
            if version and version not in self._answered:
                self._answered[version] = asyncio.Event()
            if version:
                self._answered[version].set()
            if error:
                await asyncio.sleep(0.001)  # no busy loop against a failing server


@dataclass(slots=True)
class Window:
    name: str
    start_ns: int
    end_ns: int
    server_cpu_s: float = 0.0
    client_cpu_s: float = 0.0


async def drive(args: argparse.Namespace, url: str, server_pid: int, model_dir: Path,
                first_version: int, sources: list[Path]
                ) -> tuple[Record, list[Window], list[Swap]]:
    load = ClosedLoop(url, args.concurrency, args.timeout)
    await load.start()
    await asyncio.sleep(args.warmup)

    def cpu() -> tuple[float, float]:
        return tree_cpu_s(server_pid) or 0.0, self_cpu_s()

    windows: list[Window] = []
    swaps: list[Swap] = []

    async def phase(name: str, body: Any) -> None:
        server0, client0 = cpu()
        window = Window(name, time.monotonic_ns(), 0)
        await body()
        window.end_ns = time.monotonic_ns()
        server1, client1 = cpu()
        window.server_cpu_s, window.client_cpu_s = server1 - server0, client1 - client0
        windows.append(window)

    async def swapping() -> None:
        for number in range(args.swaps):
            version = first_version + 1 + number
            started = time.monotonic_ns()
            swaps.append(Swap(version, started))
            await asyncio.to_thread(publish, model_dir, version, sources[number % len(sources)])
            await asyncio.sleep(max(0.0, args.interval - (time.monotonic_ns() - started) / 1e9))
        # The phase lasts until the last version answers (at most another ``timeout``).
        await load.answered_by(swaps[-1].version, args.timeout)

    await phase("before", lambda: asyncio.sleep(args.before))
    await phase("during", swapping)
    await phase("after", lambda: asyncio.sleep(args.after))
    await load.stop()
    return load.record, windows, swaps


# -- figures ---------------------------------------------------------------------------------


def percentiles_ms(latencies_ns: np.ndarray) -> dict[str, float | None]:
    """p50/p90/p99/p99.9 and max from the load tester's HDR histogram (None when empty)."""
    keys = ("p50", "p90", "p99", "p99.9", "max")
    if latencies_ns.size == 0:
        return dict.fromkeys(keys)
    histogram = LatencyHistogram()
    histogram.record_many(int(v) for v in latencies_ns)
    summary = histogram.summary_ms()
    return {key: round(summary[key], 3) for key in keys}


def summarise(record: Record, windows: list[Window], swaps: list[Swap],
              first_version: int) -> dict[str, Any]:
    sent = np.array(record.sent, dtype=np.int64)
    answered = np.array(record.answered, dtype=np.int64)
    version = np.array(record.version, dtype=np.int64)
    failed = np.array([bool(e) for e in record.error])
    origin = windows[0].start_ns
    phases: dict[str, Any] = {}
    for window in windows:
        issued = (sent >= window.start_ns) & (sent < window.end_ns)
        arrived_ok = (answered >= window.start_ns) & (answered < window.end_ns) & ~failed
        seconds = (window.end_ns - window.start_ns) / 1e9
        ok = issued & ~failed
        phases[window.name] = {
            "start_s": round((window.start_ns - origin) / 1e9, 3),
            "duration_s": round(seconds, 3),
            "requests": int(issued.sum()),
            "failed": int((issued & failed).sum()),
            "throughput_rps": round(float(arrived_ok.sum()) / seconds, 1),
            "latency_ms": percentiles_ms(answered[ok] - sent[ok]),
            "server_cpu_percent": round(100 * window.server_cpu_s / seconds, 1),
            "client_cpu_percent": round(100 * window.client_cpu_s / seconds, 1),
        }
    swap_rows = []
    previous = first_version
    for swap in swaps:
        new = answered[(version == swap.version) & ~failed]
        old = answered[(version == previous) & ~failed]
        swap.first_answer_ns = int(new.min()) if new.size else None
        swap.last_old_answer_ns = int(old.max()) if old.size else None
        swap_rows.append({
            "version": swap.version,
            "replaced": previous,
            "published_s": round((swap.published_ns - origin) / 1e9, 3),
            "first_answer_after_publish_ms": None if swap.first_answer_ns is None
            else round((swap.first_answer_ns - swap.published_ns) / 1e6, 1),
            # > 0: nothing answered between the old version's last answer and the new one's
            # first; < 0: both answered for that long (the old one finishing its queue).
            "handover_gap_ms": None
            if swap.first_answer_ns is None or swap.last_old_answer_ns is None
            else round((swap.first_answer_ns - swap.last_old_answer_ns) / 1e6, 1),
        })
        previous = swap.version
    errors: dict[str, int] = {}
    for text in record.error:
        if text:
            errors[text] = errors.get(text, 0) + 1
    counts = {str(v): int((version == v).sum()) for v in sorted(set(version.tolist())) if v}
    return {"phases": phases, "swaps": swap_rows, "failed_requests": int(failed.sum()),
            "errors": errors, "answers_per_version": counts,
            "total_requests": int(sent.size)}


def plot(record: Record, windows: list[Window], swaps: list[Swap], path: Path,
         title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    origin = windows[0].start_ns
    sent = (np.array(record.sent, dtype=np.int64) - origin) / 1e9
    latency = (np.array(record.answered, dtype=np.int64) - np.array(record.sent)) / 1e6
    failed = np.array([bool(e) for e in record.error])
    keep = (sent >= 0) & (sent <= (windows[-1].end_ns - origin) / 1e9)
    figure, axis = plt.subplots(figsize=(12, 4.8))
    axis.scatter(sent[keep & ~failed], latency[keep & ~failed], s=1, alpha=0.15,
                 color="tab:blue", label="request latency", rasterized=True)
    if (keep & failed).any():
        axis.scatter(sent[keep & failed], latency[keep & failed], s=12, marker="x",
                     color="black", label="failed request")
    # p50 and p99 over 250 ms bins.
    edges = np.arange(0.0, float(sent[keep].max()) + 0.25, 0.25)
    centres, p50, p99 = [], [], []
    for low, high in itertools.pairwise(edges):
        inside = latency[keep & ~failed & (sent >= low) & (sent < high)]
        if inside.size:
            centres.append((low + high) / 2)
            p50.append(float(np.percentile(inside, 50)))
            p99.append(float(np.percentile(inside, 99)))
    axis.plot(centres, p50, color="tab:green", linewidth=1.2, label="p50 per 250 ms")
    axis.plot(centres, p99, color="tab:red", linewidth=1.2, label="p99 per 250 ms")
    shades = {"before": "#f2f2f2", "during": "#fff3d6", "after": "#e9f5e9"}
    for window in windows:
        axis.axvspan((window.start_ns - origin) / 1e9, (window.end_ns - origin) / 1e9,
                     color=shades[window.name], zorder=0)
        axis.text((window.start_ns - origin) / 1e9 + 0.1, 0.98, window.name,
                  transform=axis.get_xaxis_transform(), va="top", fontsize=8)
    for number, swap in enumerate(swaps):
        axis.axvline((swap.published_ns - origin) / 1e9, color="gray", linestyle="--",
                     linewidth=0.9, label="version published" if number == 0 else None)
        if swap.first_answer_ns is not None:
            at = (swap.first_answer_ns - origin) / 1e9
            axis.axvline(at, color="tab:purple", linewidth=0.9,
                         label="new version answers" if number == 0 else None)
            axis.text(at, 0.9, f" v{swap.version}", transform=axis.get_xaxis_transform(),
                      fontsize=7, color="tab:purple")
    axis.set_yscale("log")
    axis.set(xlabel="seconds", ylabel="latency (ms)", title=title)
    axis.grid(True, which="both", alpha=0.3)
    axis.legend(fontsize=7, loc="upper right")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)


# -- RESULTS.md ------------------------------------------------------------------------------


def markdown(document: dict[str, Any]) -> str:
    env, settings = document["environment"], document["settings"]
    machine = env["machine"]
    lines = [
        SECTION,
        "",
        f"{document['date']} · {machine['nproc']} CPUs ({machine['cpu_model']}) · "
        f"git `{env['git_revision']}`",
        "",
        f"Command: `{document['command']}`",
        "",
        f"`peregrine serve` in poll mode (scan every {settings['poll_secs']} s) on CPU "
        f"{settings['server_cpus']}, this client on CPU {settings['client_cpus']}; example "
        f"`{MODEL}` (batch-1 requests, dynamic batching as in its config) with version policy "
        f"`latest 1`; closed loop, {settings['concurrency']} unary requests in flight. During "
        f"the middle phase {settings['swaps']} new versions were published "
        f"{settings['interval_s']} s apart (dot-prefixed directory renamed into place); each "
        "was loaded and warmed beside the serving one, took the traffic, and the old one was "
        "drained and unloaded.",
        "",
        "| phase | seconds | requests | failed | infer/s | p50 ms | p90 ms | p99 ms "
        "| p99.9 ms | max ms | server CPU % | client CPU % |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in PHASES:
        phase = document["phases"][name]
        lat = phase["latency_ms"]
        lines.append(
            f"| {name} | {phase['duration_s']:.1f} | {phase['requests']} | {phase['failed']} "
            f"| {phase['throughput_rps']:.0f} | {lat['p50']} | {lat['p90']} | {lat['p99']} "
            f"| {lat['p99.9']} | {lat['max']} | {phase['server_cpu_percent']} "
            f"| {phase['client_cpu_percent']} |"
        )
    lines += [
        "",
        f"Failed requests in the whole run: **{document['failed_requests']}** of "
        f"{document['total_requests']}. Answers per version: "
        + ", ".join(f"v{v}: {n}" for v, n in document["answers_per_version"].items()) + ".",
        "",
        "| swap | published at s | new version's first answer after publish ms "
        "| handover gap ms |",
        "|---:|---:|---:|---:|",
    ]
    for swap in document["swaps"]:
        lines.append(
            f"| {swap['replaced']} → {swap['version']} | {swap['published_s']} "
            f"| {swap['first_answer_after_publish_ms']} "
            f"| {swap['handover_gap_ms']} |"
        )
    lines += [
        "",
        "The first-answer delay is the wait for the next repository scan plus the load and "
        "warm-up. Handover gap: time from the old version's last answer to the new one's "
        "first (negative: both answered for that long while the old one finished its queue).",
        "",
        f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} and "
        f"{document['loadavg'][1]:.2f} on {machine['nproc']} CPUs; other jobs sharing the "
        "machine show up as latency spikes in every phase.",
        "",
        "![latency over time](results/swap_under_load.png) · "
        "data: [results/swap_under_load.json](results/swap_under_load.json)",
        "",
    ]
    return "\n".join(lines)


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--concurrency", type=int, default=8, help="requests in flight")
    parser.add_argument("--swaps", type=int, default=5, help="versions published")
    parser.add_argument("--interval", type=float, default=2.0, help="seconds between them")
    parser.add_argument("--before", type=float, default=8.0, help="seconds before the swaps")
    parser.add_argument("--after", type=float, default=8.0, help="seconds after the swaps")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds first")
    parser.add_argument("--poll-secs", type=float, default=0.5, help="repository scan period")
    parser.add_argument("--timeout", type=float, default=10.0, help="per-request deadline")
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list of the server")
    parser.add_argument("--client-cpus", default="1", help="CPUs of this client")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "swap_under_load.json")
    parser.add_argument("--no-results-md", action="store_true",
                        help="do not update bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.studies.swap_under_load", *(argv or sys.argv[1:])])
    multi_cpu = len(os.sched_getaffinity(0)) > 1
    this_machine = machine()  # before pinning: nproc counts the CPUs we may use
    load_at_start = os.getloadavg()[0]
    server_cpus = args.server_cpus if multi_cpu else None
    with tempfile.TemporaryDirectory(prefix="swap-under-load-") as tmp:
        root = Path(tmp) / "models"
        root.mkdir()
        model_dir, first_version, sources = prepare_repository(root)
        extra = ["--model-control-mode", "poll", "--repository-poll-secs", str(args.poll_secs),
                 "--state-file", str(Path(tmp) / "state.json")]
        with PeregrineProcess(root, cpus=server_cpus, name="peregrine-swap",
                              extra_args=extra) as server:
            client_cpus = pin_self(args.client_cpus) if multi_cpu else sorted(
                os.sched_getaffinity(0))
            runner_factory: Any = None
            with contextlib.suppress(ImportError):
                import uvloop

                runner_factory = uvloop.new_event_loop
            with asyncio.Runner(loop_factory=runner_factory) as runner:
                record, windows, swaps = runner.run(
                    drive(args, server.url, server.pid, model_dir, first_version, sources)
                )
            env = {**environment(server.pid), "machine": this_machine}
    summary = summarise(record, windows, swaps, first_version)
    document = {
        "kind": "swap_under_load",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {
            "model": MODEL, "concurrency": args.concurrency, "swaps": args.swaps,
            "interval_s": args.interval, "before_s": args.before, "after_s": args.after,
            "warmup_s": args.warmup, "poll_secs": args.poll_secs, "timeout_s": args.timeout,
            "server_cpus": server_cpus or "any", "client_cpus": ",".join(map(str, client_cpus)),
            "first_version": first_version,
        },
        "environment": env,
        "loadavg": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        **summary,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(record, windows, swaps, png,
         f"{MODEL}: {args.swaps} hot swaps under a closed loop of {args.concurrency} "
         f"({env['machine']['nproc']} CPUs, git {env['git_revision'][:12]})")
    if not args.no_results_md:
        replace_section(markdown(document))
    for name in PHASES:
        phase = document["phases"][name]
        lat = phase["latency_ms"]
        print(f"{name:>6}: {phase['requests']:6d} requests, {phase['failed']} failed, "
              f"{phase['throughput_rps']:7.0f} infer/s, p50 {lat['p50']} ms, "
              f"p99 {lat['p99']} ms, max {lat['max']} ms, server CPU "
              f"{phase['server_cpu_percent']}%, client CPU {phase['client_cpu_percent']}%")
    print(f"failed requests: {document['failed_requests']}; answers per version: "
          f"{document['answers_per_version']}")
    print(f"wrote {args.out}, {png}" + ("" if args.no_results_md else f", {RESULTS_MD}"))
    return 0 if document["failed_requests"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
