"""Tables of a run's steps: the rows, and as plain text for the terminal."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "n/a"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _errors(step: dict[str, Any]) -> str:
    errors = step["errors"]
    if not errors:
        return "0"
    return " ".join(f"{code}:{count}" for code, count in sorted(errors.items()))


def step_key(step: dict[str, Any]) -> str:
    return f"c={step['concurrency']}" if step["concurrency"] is not None else f"{step['rate']:g}/s"


def step_rows(steps: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = ["load", "infer/s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms", "ok",
              "errors", "client CPU%", "server CPU%", "queue us", "compute us", "batch",
              "bound"]
    open_loop = any(step["send_lag_ms"] for step in steps)
    if open_loop:
        header.insert(7, "lag p99 ms")
    rows = []
    for step in steps:
        latency = step["latency_ms"]
        split = step["server_split"] or {}
        server_cpu = step["server_cpu"]
        row = [
            step_key(step),
            _fmt(step["throughput_rps"], 0),
            _fmt(latency["p50"], 3), _fmt(latency["p90"], 3), _fmt(latency["p99"], 3),
            _fmt(latency["p99.9"], 3), _fmt(latency["max"], 3),
            str(step["ok"]), _errors(step),
            _fmt(step["client_cpu"]["percent"], 0),
            _fmt(server_cpu["percent"], 0) if server_cpu else "n/a",
            _fmt(split.get("queue_us"), 0) if split else "n/a",
            _fmt(split.get("compute_us"), 0) if split else "n/a",
            _fmt(split.get("mean_batch_rows"), 1) if split else "n/a",
            step["bound"],
        ]
        if open_loop:
            lag = step["send_lag_ms"]
            row.insert(7, _fmt(lag["p99"], 3) if lag else "n/a")
        rows.append(row)
    return header, rows


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows,
                                                                         strict=True)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(str(c).rjust(w) for c, w in zip(row, widths, strict=True))
              for row in rows]
    return "\n".join(lines)


def run_summary(document: dict[str, Any]) -> str:
    """The heading lines and the step table of one run."""
    inputs = document["inputs"]
    env = document["environment"]
    pinning = env["pinning"]
    server = document["server"]
    name = (server.get("metadata") or {}).get("name", "?")
    load = (f"closed loop, {inputs['concurrency']} in flight" if inputs["mode"] == "closed"
            else f"open loop ({inputs['arrival']}), rates {inputs['rates']}/s")
    amount = (f"{inputs['duration_s']:g} s" if inputs["duration_s"] is not None
              else f"{inputs['requests']} requests")
    lines = [
        f"{inputs['model']} via {inputs['rpc']} on {name} at {server['url']}: {load}; "
        f"{amount} per step after {inputs['warmup_s']:g} s warm-up; "
        f"{inputs['processes']} generator process(es); {inputs['repeats']} repeat(s), median",
        f"request: {inputs['request']['bytes']} bytes, {inputs['request']['rows']} row(s); "
        f"generator CPUs {pinning['generator_cpus']}, server CPUs "
        f"{pinning['server_cpus'] if pinning['server_cpus'] is not None else 'unknown'}; "
        f"git {env['git_revision'][:12]}",
        "",
        text_table(*step_rows(document["steps"])),
    ]
    return "\n".join(lines)
