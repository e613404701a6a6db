"""One benchmark run: prepare the request, drive each step of the sweep, gather the figures.

The parent process only orchestrates (metadata, ModelStatistics and CPU snapshots at the
window edges, the progress line); the load comes from generator processes
(bench/loadgen/workers.py),
so the parent's own work never lands on the measured path.
"""

from __future__ import annotations

import datetime as dt
import os
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench.loadgen.cpu import listening_pid, tree_cpu_s
from bench.loadgen.environment import environment, portable
from bench.loadgen.histogram import LatencyHistogram
from bench.loadgen.inputs import InputTensor, TensorMeta, load_input_file, random_inputs
from bench.loadgen.loops import StepPlan, Target
from bench.loadgen.progress import ProgressLine
from bench.loadgen.schema import SCHEMA
from bench.loadgen.server_info import ServerInfo, StatsSnapshot, split_between
from bench.loadgen.wire import STREAM_FORMATS, infer_request_bytes
from bench.loadgen.workers import WorkerPool, split_plans
from server.cli.connection import ClientSecurity

#: A pinned server above this CPU share was the bottleneck; a client above it, the client.
BUSY_PERCENT = 90.0
_LEAD_S = 0.3  # time given to the processes between the plan and the synchronised start


@dataclass(frozen=True)
class RunConfig:
    url: str
    model: str
    version: str = ""
    rpc: str = "unary"  # unary | stream
    concurrency: tuple[int, ...] = (1,)
    rates: tuple[float, ...] = ()  # non-empty: open loop at these rates
    arrival: str = "poisson"
    max_inflight: int = 1024  # open loop: cap on requests in flight
    duration_s: float | None = 10.0
    requests: int | None = None
    warmup_s: float = 2.0
    repeats: int = 1
    processes: int = 1
    batch_size: int = 1
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    dynamic_dim: int = 1
    input_file: Path | None = None
    input_name: str | None = None
    seed: int = 0
    timeout_s: float = 30.0
    drain_s: float = 10.0
    server_pid: int | None = None
    label: str = ""
    stream_format: str = "auto"  # auto | triton | plain (bench/loadgen/wire.py)
    #: TLS and the token; the run document records only whether TLS was on.
    security: ClientSecurity = field(default_factory=ClientSecurity)

    @property
    def mode(self) -> str:
        return "open" if self.rates else "closed"

    def validate(self) -> None:
        if self.rpc not in ("unary", "stream"):
            raise ValueError(f"rpc must be unary or stream, got {self.rpc!r}")
        if (self.duration_s is None) == (self.requests is None):
            raise ValueError("give exactly one of a duration and a request count")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ValueError("duration must be positive")
        if self.requests is not None and self.requests <= 0:
            raise ValueError("request count must be positive")
        if self.warmup_s < 0 or self.repeats < 1 or self.processes < 1 or self.batch_size < 1:
            raise ValueError("warm-up >= 0, repeats >= 1, processes >= 1, batch size >= 1")
        if self.stream_format not in ("auto", *STREAM_FORMATS):
            raise ValueError(f"stream format must be auto or one of {STREAM_FORMATS}")
        if self.arrival not in ("poisson", "constant"):
            raise ValueError(f"arrival must be poisson or constant, got {self.arrival!r}")

    def as_inputs(self) -> dict[str, Any]:
        inputs = asdict(self)
        del inputs["security"]  # the token and keys stay out of the run document
        inputs["tls"] = self.security.ssl
        inputs["mode"] = self.mode
        inputs["sweep"] = "rate" if self.rates else "concurrency"
        inputs["concurrency"] = list(self.concurrency)
        inputs["rates"] = list(self.rates)
        inputs["shapes"] = {k: list(v) for k, v in self.shapes.items()}
        inputs["input_file"] = portable(str(self.input_file)) if self.input_file else None
        return inputs


def request_tensors(config: RunConfig, info: ServerInfo) -> list[InputTensor]:
    metas: list[TensorMeta] | None = info.inputs(config.model, config.version)
    if config.input_file is not None:
        return load_input_file(config.input_file, metas, config.input_name)
    if metas is None:
        raise ValueError(f"the server gives no input metadata for '{config.model}': "
                         "pass --input-file")
    return random_inputs(metas, config.batch_size, config.shapes, config.dynamic_dim,
                         config.seed, info.batches(config.model, config.version))


def _sleep_until(at: float, pool: WorkerPool, progress: ProgressLine, label: str,
                 phase: str) -> None:
    while (remaining := at - time.monotonic()) > 0:
        time.sleep(min(remaining, 0.5))
        progress.update(label, phase, *pool.counts())


class StepDriver:
    """Runs one step (all processes) and turns the merged outcome into a step record."""

    def __init__(self, config: RunConfig, pool: WorkerPool, info: ServerInfo, rows: int,
                 progress: ProgressLine) -> None:
        self._config = config
        self._pool = pool
        self._info = info
        self._rows = rows
        self._progress = progress

    def _server_cpu(self) -> float | None:
        pid = self._config.server_pid
        return tree_cpu_s(pid) if pid else None

    def _snapshot(self) -> tuple[StatsSnapshot | None, float | None, float]:
        return (self._info.statistics(self._config.model, self._config.version),
                self._server_cpu(), time.monotonic())

    def run(self, concurrency: int, rate: float, repeat: int) -> dict[str, Any]:
        config = self._config
        start_at = time.monotonic() + _LEAD_S
        plan = StepPlan(
            rpc=config.rpc, mode=config.mode,
            concurrency=concurrency if config.mode == "closed" else config.max_inflight,
            rate=rate, arrival=config.arrival, phase_s=0.0,
            start_at_ns=int(start_at * 1e9), warmup_s=config.warmup_s,
            duration_s=config.duration_s, requests=config.requests,
            timeout_s=config.timeout_s, drain_s=config.drain_s, seed=config.seed + 1000 * repeat,
        )
        label = (f"c={concurrency}" if config.mode == "closed" else f"rate={rate:g}/s") + (
            f" #{repeat + 1}" if config.repeats > 1 else "")
        self._progress.reset()
        self._pool.start(split_plans(plan, self._pool.size))
        window_start = start_at + config.warmup_s
        _sleep_until(window_start, self._pool, self._progress, label, "warm-up")
        before = self._snapshot()
        after: tuple[StatsSnapshot | None, float | None, float] | None = None
        window_end = window_start + (config.duration_s or 0.0)
        while not self._pool.ready():
            now = time.monotonic()
            if config.duration_s is not None and after is None and now >= window_end:
                after = self._snapshot()
            phase = ("measuring" if config.duration_s is None or now < window_end
                     else "draining")
            self._progress.update(label, phase, *self._pool.counts())
            timed = config.duration_s is not None and now < window_end
            time.sleep(min(0.5, max(0.01, window_end - now)) if timed else 0.05)
        results = self._pool.results()
        if after is None:
            after = self._snapshot()
        self._progress.clear()
        return self._record(concurrency, rate, results, before, after)

    def _record(self, concurrency: int, rate: float, results: list[dict[str, Any]],
                before: tuple[StatsSnapshot | None, float | None, float],
                after: tuple[StatsSnapshot | None, float | None, float]) -> dict[str, Any]:
        config = self._config
        histogram = LatencyHistogram.merged(
            [LatencyHistogram.decode(r["histogram"]) for r in results])
        lag = LatencyHistogram.merged([LatencyHistogram.decode(r["send_lag"]) for r in results])
        errors: dict[str, int] = {}
        for result in results:
            for code, count in result["errors"].items():
                errors[code] = errors.get(code, 0) + count
        sent = sum(r["sent"] for r in results)
        ok = sum(r["ok"] for r in results)
        window_s = max(r["window_s"] for r in results)
        throughput = sum(r["completed_in_window"] for r in results) / window_s
        client_cpu_s = sum(r["cpu_s"] for r in results)
        answered = max(ok + sum(errors.values()), 1)
        client_cpu = {"percent": 100.0 * client_cpu_s / window_s,
                      "us_per_request": 1e6 * client_cpu_s / answered}
        server_cpu = None
        if before[1] is not None and after[1] is not None:
            seconds = after[1] - before[1]
            wall = max(after[2] - before[2], 1e-9)
            server_cpu = {"percent": 100.0 * seconds / wall,
                          "us_per_request": 1e6 * seconds / max(throughput * wall, 1)}
        split = (split_between(before[0], after[0])
                 if before[0] is not None and after[0] is not None else None)
        return {
            "concurrency": concurrency if config.mode == "closed" else None,
            "rate": rate if config.mode == "open" else None,
            "throughput_rps": throughput,
            "samples_per_s": throughput * self._rows,
            "sent": sent,
            "ok": ok,
            "errors": errors,
            "window_s": window_s,
            "latency_ms": histogram.summary_ms(),
            "histogram": histogram.encode(),
            "send_lag_ms": lag.summary_ms() if config.mode == "open" else None,
            "client_cpu": client_cpu,
            "server_cpu": server_cpu,
            "server_split": split,
            "bound": bound_by(client_cpu["percent"],
                              server_cpu["percent"] if server_cpu else None,
                              min(self._pool.size, len(os.sched_getaffinity(0)))),
        }


def bound_by(client_percent: float, server_percent: float | None, client_cores: int = 1) -> str:
    """Which side saturated: 'server', 'client', or 'neither' (latency-bound or unknown).

    ``client_cores``: the cores the generator processes could use together; a pinned
    server is assumed to have one.
    """
    if server_percent is not None and server_percent >= BUSY_PERCENT:
        return "server"
    if client_percent >= BUSY_PERCENT * client_cores:
        return "client"
    return "neither" if server_percent is not None else "unknown"


def median_repeat(repeats: list[dict[str, Any]]) -> dict[str, Any]:
    """The repeat with the median throughput, with every repeat's headline figures kept."""
    ordered = sorted(repeats, key=lambda step: step["throughput_rps"])
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["repeats"] = [
        {"throughput_rps": r["throughput_rps"], "p50_ms": r["latency_ms"]["p50"],
         "p99_ms": r["latency_ms"]["p99"]}
        for r in repeats
    ]
    return chosen


LOOPBACK = ("127.0.0.1", "localhost", "[::1]", "::1")


def find_server_pid(url: str) -> int | None:
    """The pid listening on a loopback ``url``'s port; never this process (an in-process
    server's CPU would include the orchestrator's)."""
    host, _, port = url.rpartition(":")
    if host not in LOOPBACK or not port.isdigit():
        return None
    pid = listening_pid(int(port))
    return pid if pid != os.getpid() else None


def run(config: RunConfig, progress: ProgressLine | None = None,
        command: list[str] | None = None) -> dict[str, Any]:
    """Drive every step of ``config`` and return the run document (see bench/loadgen/schema.py)."""
    config.validate()
    progress = progress or ProgressLine()
    pid_source = "flag" if config.server_pid else None
    if config.server_pid is None:
        found = find_server_pid(config.url)
        if found is not None:
            config, pid_source = replace(config, server_pid=found), "found"
    info = ServerInfo(config.url, security=config.security)
    try:
        info.wait_ready(config.model)
        tensors = request_tensors(config, info)
        batched = info.batches(config.model, config.version)
        rows = tensors[0].rows if tensors and batched is not False else 1
        payload = infer_request_bytes(config.model, config.version, tensors)
        metadata = info.server_metadata()
        stream_format = config.stream_format
        if stream_format == "auto":  # MLServer streams bare ModelInferResponse messages
            stream_format = "plain" if (metadata or {}).get("name") == "mlserver" else "triton"
        target = Target(url=config.url, payload=payload, rows=rows,
                        stream_format=stream_format, security=config.security)
        points = ([(c, 0.0) for c in config.concurrency] if config.mode == "closed"
                  else [(config.max_inflight, r) for r in config.rates])
        steps = []
        with WorkerPool(config.processes, target) as pool:
            driver = StepDriver(config, pool, info, rows, progress)
            for concurrency, rate in points:
                repeats = [driver.run(concurrency, rate, i) for i in range(config.repeats)]
                steps.append(median_repeat(repeats))
        server = {"url": config.url, "pid": config.server_pid, "pid_source": pid_source,
                  "metadata": metadata, "stream_format": stream_format}
    finally:
        info.close()
    return {
        "schema": SCHEMA,
        "kind": "run",
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": [portable(arg) for arg in (command if command is not None else sys.argv)],
        "inputs": {
            **config.as_inputs(),
            "request": {
                "tensors": [{"name": t.name, "datatype": t.datatype, "shape": list(t.shape)}
                            for t in tensors],
                "rows": rows,
                "bytes": len(payload),
            },
        },
        "server": server,
        "environment": environment(config.server_pid),
        "steps": steps,
    }
