"""server.routing.canary.judge: one step's verdict from the baseline's and candidate's windows."""

from __future__ import annotations

import pytest

from server.routing.canary import judge
from server.routing.figures import Window
from server.routing.table import CanarySpec

SPEC = CanarySpec(baseline="a", candidate="b", steps=(1.0, 10.0, 50.0, 100.0),
                  step_interval_secs=60.0, max_error_rate_increase=0.01, max_p99_ratio=1.5,
                  min_requests=20)
HEALTHY = Window(requests=1000, errors=1, p99_ms=10.0)


def test_waits_until_the_candidate_has_served_min_requests() -> None:
    # Even a candidate failing everything is not judged on too few requests.
    verdict = judge(SPEC, HEALTHY, Window(requests=19, errors=19, p99_ms=500.0), 3600.0)
    assert verdict.action == "wait"
    assert "19 of 20" in verdict.reason


def test_rolls_back_on_the_error_rate() -> None:
    # Baseline 0.1 %, allowed 1.1 %; 3 of 100 is 3 %.
    verdict = judge(SPEC, HEALTHY, Window(requests=100, errors=3, p99_ms=10.0), 1.0)
    assert verdict.action == "rollback"
    assert "error rate 0.030" in verdict.reason and "baseline 0.001" in verdict.reason


def test_an_error_rate_within_the_allowed_increase_is_fine() -> None:
    verdict = judge(SPEC, HEALTHY, Window(requests=100, errors=1, p99_ms=10.0), 61.0)
    assert verdict.action == "advance"


def test_rolls_back_on_p99_before_the_interval_is_over() -> None:
    verdict = judge(SPEC, HEALTHY, Window(requests=50, errors=0, p99_ms=15.1), 0.5)
    assert verdict.action == "rollback"
    assert "p99 15.10 ms exceeds 1.50 x baseline p99 10.00 ms" in verdict.reason


def test_p99_is_not_judged_without_a_baseline_p99() -> None:
    verdict = judge(SPEC, Window(0, 0, 0.0), Window(requests=50, errors=0, p99_ms=900.0), 61.0)
    assert verdict.action == "advance"


def test_waits_within_the_guard_rails_until_the_interval_is_over() -> None:
    candidate = Window(requests=50, errors=0, p99_ms=14.9)
    assert judge(SPEC, HEALTHY, candidate, 59.9).action == "wait"
    verdict = judge(SPEC, HEALTHY, candidate, 60.0)
    assert verdict.action == "advance"
    assert "50 requests" in verdict.reason


@pytest.mark.parametrize(("candidate", "action"), [
    (Window(20, 0, 10.0), "advance"),      # exactly min_requests
    (Window(20, 1, 10.0), "rollback"),     # 5 % errors
    (Window(20, 0, 15.0), "advance"),      # exactly at the ratio
])
def test_edges(candidate: Window, action: str) -> None:
    assert judge(SPEC, HEALTHY, candidate, 60.0).action == action


def test_window_error_rate() -> None:
    assert Window(0, 0, 0.0).error_rate == 0.0
    assert Window(8, 2, 0.0).error_rate == 0.25
