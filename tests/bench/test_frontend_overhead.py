"""The arithmetic of bench/studies/frontend_overhead.py: interpolation, yardsticks, verdicts,
and the
per-thread CPU split read from /proc."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

import pytest

from bench.studies.frontend_overhead import (
    figures,
    markdown,
    per_sample_us,
    thread_split,
    thread_ticks,
    verdicts,
)

# us_per_run at each batch size: 10 us alone, 2 us per sample at 8, 1 us per sample at 64.
CEILING = {"1": {"us_per_run": 10.0}, "8": {"us_per_run": 16.0}, "64": {"us_per_run": 64.0}}


def step(rps: float, p50: float, batch: float | None = None, cpu_us: float | None = None,
         bound: str = "server") -> dict[str, Any]:
    return {
        "throughput_rps": rps,
        "latency_ms": {"p50": p50, "p99": 2 * p50},
        "server_split": None if batch is None else {"mean_batch_rows": batch},
        "server_cpu": None if cpu_us is None else {"us_per_request": cpu_us},
        "bound": bound,
    }


def test_per_sample_time_is_interpolated_between_measured_batches() -> None:
    assert per_sample_us(CEILING, 1) == 10.0
    assert per_sample_us(CEILING, 8) == 2.0
    assert per_sample_us(CEILING, 4.5) == pytest.approx(6.0)  # halfway from 10 to 2
    assert per_sample_us(CEILING, 0.5) == 10.0  # below the smallest: the smallest
    assert per_sample_us(CEILING, 128) == 1.0  # above the largest: the largest


def test_figures_follow_the_yardsticks() -> None:
    # Floor: 4,000/s = 250 us per request; ours 2,000/s = 500 us; batch 1 costs 10 us.
    f = figures(step(2000, 0.6, batch=1.0, cpu_us=480), step(4000, 0.4, cpu_us=240),
                step(1600, 0.7), CEILING)
    assert f["overhead_us"] == pytest.approx(500 - 250 - 10)
    assert f["overhead_cpu_us"] == pytest.approx(480 - 240 - 10)
    assert f["bound_rps"] == pytest.approx(1e6 / 260)
    assert f["vs_bound"] == pytest.approx(2000 * 260 / 1e6)
    assert f["vs_floor"] == pytest.approx(0.5)
    assert f["p50_target_ms"] == pytest.approx(1.25 * (0.4 + 0.010))
    assert f["vs_plain"] == pytest.approx(2000 / 1600) and f["plain_p50_ms"] == 0.7
    # Without the server's statistics the batch counts as 1 and the CPU overhead is unknown;
    # without a plain-Python run there is no comparison with it.
    g = figures(step(2000, 0.6), step(4000, 0.4), None, CEILING)
    assert g["mean_batch"] == 1.0
    assert g["overhead_cpu_us"] is None
    assert g["vs_plain"] is None


def test_verdicts_apply_each_target_to_its_case() -> None:
    floor = step(4000, 0.4, cpu_us=240)
    plain = step(2000, 0.45)
    cases = {
        "mlp_classifier/unary/1": figures(step(1800, 0.5, batch=1.0), floor, plain, CEILING),
        "mlp_classifier/unary/64": figures(step(3800, 16, batch=8.0), floor, plain, CEILING),
        "mlp_classifier/stream/64": figures(step(2000, 8, batch=8.0), floor, plain, CEILING),
        "cnn/unary/64": figures(step(3700, 16, batch=1.0), floor, plain, CEILING),
        "cnn/unary/1": figures(step(1800, 0.5, batch=1.0), floor, plain, CEILING),
    }
    rows: dict[str, list[dict[str, Any]]] = {}
    for row in verdicts(cases):
        rows.setdefault(row["case"], []).append(row)
    p50, vs_plain_p50 = rows["mlp_classifier/unary/1"]
    assert p50["reached"]  # 0.5 <= 1.25 * 0.41
    assert not vs_plain_p50["reached"]  # 0.5 ms > the plain server's 0.45
    unary_plain, unary_floor = rows["mlp_classifier/unary/64"]
    assert unary_plain["reached"] and unary_plain["measured"] == pytest.approx(1.9)
    assert unary_floor["reached"] and unary_floor["measured"] == pytest.approx(0.95)
    stream_plain, stream_floor = rows["mlp_classifier/stream/64"]
    assert not stream_plain["reached"]  # 1.0 x the plain server < 1.3
    assert not stream_floor["reached"]  # 0.5 of the floor < 0.75
    cnn_plain, cnn_bound = rows["cnn/unary/64"]
    assert cnn_plain["reached"] and cnn_plain["limit"] == 1.1
    assert cnn_bound["reached"]  # 3700 * 260 us = 0.962 of the bound
    assert "cnn/unary/1" not in rows  # the 1-in-flight targets are the MLP's
    text = markdown({
        "date": "2026-11-25T00:00:00+00:00", "command": "python -m bench.studies.frontend_overhead",
        "environment": {"machine": {"nproc": 2, "cpu_model": "test"}, "git_revision": "abc"},
        "load_average_1m": 0.5,
        "scenario": {"duration_s": 3, "warmup_s": 1, "repeats": 3, "server_cpus": "0",
                     "generator_cpus": "1"},
        "cases": cases, "verdicts": [r for found in rows.values() for r in found],
        "threads": {"peregrine/cnn/unary": {"event loop (main thread)": 3.0,
                                            "gRPC event engine": 1.0}},
    })
    assert "| mlp_classifier/stream/64 |" in text and "**no**" in text
    assert "event loop (main thread) 75%, gRPC event engine 25%" in text


def test_thread_split_groups_this_process_threads() -> None:
    pid = os.getpid()
    stop = threading.Event()

    def spin() -> None:
        while not stop.is_set():
            sum(range(1000))

    worker = threading.Thread(target=spin, name="spinner")
    before = thread_ticks(pid)
    worker.start()
    deadline = time.monotonic() + 0.3
    while time.monotonic() < deadline:
        sum(range(1000))
    after = thread_ticks(pid)
    stop.set()
    worker.join()
    assert pid in before and pid in after
    split = thread_split(pid, before, after)
    assert split.get("event loop (main thread)", 0) > 0
    assert all(used > 0 for used in split.values())


def test_batcher_choices_report_ratios_against_the_default() -> None:
    from bench.studies.batcher_choices import markdown as choices_markdown

    def cell(rps: float) -> dict[str, float]:
        return {"rps": rps, "p50_ms": 0.5, "p99_ms": 1.0, "mean_batch": 2.0}

    text = choices_markdown({
        "date": "2026-12-07T00:00:00+00:00", "command": "python -m bench.studies.batcher_choices",
        "environment": {"machine": {"nproc": 2, "cpu_model": "test"}, "git_revision": "abc"},
        "load_average_1m": 0.5,
        "scenario": {"duration_s": 2, "warmup_s": 1, "repeats": 3, "server_cpus": "0",
                     "generator_cpus": "1"},
        "results": {"default": {"mlp_classifier/unary/64": cell(2000)},
                    "no-inline": {"mlp_classifier/unary/64": cell(1500)}},
    })
    assert "| mlp_classifier unary 64 | 2,000 (0.50, batch 2.0) | 1,500 (0.50, batch 2.0) 0.75x" \
        " | n/a | n/a |" in text
