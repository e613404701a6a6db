"""bench/studies/soak.py: the outcome tally, the footprint arithmetic, and a few seconds of
the real thing (every kind of client against a `peregrine serve` subprocess) so the study
does not rot."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import tritonclient.grpc as grpcclient

from bench.studies.soak import main
from bench.studies.soak_load import Tally, Worker
from bench.studies.soak_report import markdown, summarise


def test_the_tally_tells_expected_statuses_from_unexpected_ones() -> None:
    tally = Tally()
    tally.count("unary/cnn", "OK")
    tally.count("error/oversize", "RESOURCE_EXHAUSTED")
    tally.count("error/unknown_model", "NOT_FOUND")
    tally.count("error/oversize", "INVALID_ARGUMENT", "wrong refusal")
    tally.count("unary/mlp_classifier", "UNAVAILABLE", "dropped during a swap")
    assert tally.unexpected_count == 2
    assert [(e["kind"], e["status"]) for e in tally.unexpected] == [
        ("error/oversize", "INVALID_ARGUMENT"), ("unary/mlp_classifier", "UNAVAILABLE")]


class Failing(Worker):
    def round(self, client: grpcclient.InferenceServerClient) -> None:
        raise RuntimeError("broken driver")


def test_a_worker_that_dies_counts_as_unexpected() -> None:
    tally = Tally()
    worker = Failing("failing", "127.0.0.1:1", tally, threading.Event())
    worker.start()
    worker.join(timeout=10)
    assert tally.unexpected_count == 1
    assert tally.unexpected[0]["kind"] == "crash/failing"
    assert "broken driver" in tally.unexpected[0]["message"]


def sample(t_s: float, rss_mib: float, fds: int) -> dict[str, Any]:
    return {"t_s": t_s, "rss_kib": rss_mib * 1024, "fds": fds, "threads": 30, "counts": {}}


def test_footprint_compares_medians_after_the_warm_up_and_at_the_end() -> None:
    tally = Tally()
    tally.count("route/change", "OK")
    # 100 s, warm-up 20 s, 10 s windows: [20, 30] and [90, 100].
    samples = [sample(t, 100.0, 20) for t in range(0, 20)]
    samples += [sample(t, 200.0, 30) for t in range(20, 31)]
    samples += [sample(t, 205.0, 30) for t in range(31, 90)]
    samples += [sample(t, 220.0 if t != 95 else 400.0, 33 if t != 95 else 90)
                for t in range(90, 101)]
    summary = summarise(tally, samples, [], warmup_s=20.0)
    assert summary["rss"]["warm_mib"] == 200.0 and summary["rss"]["end_mib"] == 220.0
    assert summary["rss"]["growth_percent"] == 10.0
    assert summary["rss"]["max_mib"] == 400.0  # one reading, not the median
    assert summary["fds"]["warm"] == 30 and summary["fds"]["end"] == 33
    assert summary["goals"] == {"no_unexpected_errors": True,
                                "rss_growth_under_5_percent": False, "fds_flat": False}
    assert summary["route_changes"] == 1


def test_a_short_soak_runs_every_kind_of_client(tmp_path: Path) -> None:
    out = tmp_path / "soak.json"
    main(["--minutes", "0.1", "--swap-every", "2", "--route-every", "0.5",
          "--sample-every", "0.5", "--server-cpus", "", "--client-cpus", "",
          "--out", str(out), "--no-results-md"])
    document = json.loads(out.read_text())
    assert document["unexpected_errors"] == 0, document["unexpected_examples"]
    totals = document["totals"]
    assert all(totals.get(family, 0) > 0 for family in ("unary", "stream", "shm", "error")), \
        totals
    requests = document["requests"]
    assert set(requests["error/bad_shape"]) == {"INVALID_ARGUMENT"}
    assert set(requests["error/unknown_model"]) == {"NOT_FOUND"}
    assert set(requests["error/oversize"]) == {"RESOURCE_EXHAUSTED"}
    assert {k for k in requests if k.startswith("stream/")} >= {
        "stream/mlp_classifier", "stream/mlp_routed", "stream/cnn"}
    assert requests["shm/register"]["OK"] == requests["shm/unregister"]["OK"] > 0
    assert document["swaps"] and document["route_changes"] > 0
    assert len(document["samples"]) >= 2 and document["rss"]["end_mib"] > 0
    assert document["drift"]["samples"] > 0  # drift sampling is on for the swapped model
    assert out.with_suffix(".png").stat().st_size > 0
    section = markdown(document)
    assert section.startswith("## Soak") and "| error/oversize |" in section
