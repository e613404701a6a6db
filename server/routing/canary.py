"""Canary rollouts: step the candidate's weight up while it stays within the guard rails."""

from __future__ import annotations

from dataclasses import dataclass

from server.routing.figures import Window
from server.routing.table import CanarySpec


@dataclass(frozen=True, slots=True)
class Verdict:
    action: str  # "wait", "advance" or "rollback"
    reason: str = ""


def judge(spec: CanarySpec, baseline: Window, candidate: Window, step_elapsed: float) -> Verdict:
    """Pure decision for one step, from the two variants' figures since the step began.

    A candidate is judged once it has served ``min_requests``: it rolls back at once when it
    breaks a guard rail, and advances when the step's interval is over and it has not.
    """
    if candidate.requests < spec.min_requests:
        return Verdict("wait", f"candidate served {candidate.requests} of "
                               f"{spec.min_requests} requests needed to judge")
    allowed = baseline.error_rate + spec.max_error_rate_increase
    if candidate.error_rate > allowed:
        return Verdict("rollback", f"candidate error rate {candidate.error_rate:.3f} exceeds "
                                   f"baseline {baseline.error_rate:.3f} + "
                                   f"{spec.max_error_rate_increase:.3f}")
    if baseline.p99_ms > 0 and candidate.p99_ms > baseline.p99_ms * spec.max_p99_ratio:
        return Verdict("rollback", f"candidate p99 {candidate.p99_ms:.2f} ms exceeds "
                                   f"{spec.max_p99_ratio:.2f} x baseline p99 "
                                   f"{baseline.p99_ms:.2f} ms")
    if step_elapsed < spec.step_interval_secs:
        return Verdict("wait", "within the guard rails; step not over")
    return Verdict("advance", f"candidate within the guard rails over "
                              f"{candidate.requests} requests")
