"""server.routing.outcome.classify: only the server's faults count against a variant."""

from __future__ import annotations

import time

import numpy as np
import pytest

from server.errors import (
    BackendError,
    Cancelled,
    DeadlineExceeded,
    InvalidInput,
    LoadFailed,
    ModelNotFound,
    ModelNotReady,
    NotAllowed,
    Overloaded,
    PeregrineError,
    PermissionDenied,
    RateLimited,
    Unauthenticated,
    Unsupported,
)
from server.routing.outcome import Outcome, classify
from server.types import DataType, InferRequest


def request(deadline_ns: int | None = None, timeout_us: int = 0) -> InferRequest:
    return InferRequest(model_name="m", model_version="", id="",
                        inputs={"x": np.zeros((1, 4), np.float32)},
                        input_types={"x": DataType.FP32},
                        deadline_ns=deadline_ns, timeout_us=timeout_us)


@pytest.mark.parametrize("error", [
    InvalidInput("bad shape"), ModelNotFound("no such output"), PermissionDenied("role"),
    Unauthenticated("token"), RateLimited("limit", retry_after_ms=10), Overloaded("queue full"),
    Cancelled("gone"), Unsupported("feature"), NotAllowed("precondition"),
])
def test_the_clients_doing_is_refused_not_failed(error: PeregrineError) -> None:
    assert classify(error, request(), 0.01) is Outcome.REFUSED


@pytest.mark.parametrize("error", [
    BackendError("crashed"), ModelNotReady("not serving"), LoadFailed("internal"),
    RuntimeError("a bug"),
])
def test_server_faults_fail(error: Exception) -> None:
    assert classify(error, request(), 0.01) is Outcome.FAILED


def test_a_timeout_is_the_servers_unless_the_clients_own_budget_ran_out() -> None:
    timeout = DeadlineExceeded("timed out in the queue")
    now = time.perf_counter_ns()
    # No budget of the client's: the model's queue policy (or execution) timeout cut it.
    assert classify(timeout, request(), 0.5) is Outcome.FAILED
    # The client's gRPC deadline had passed, or its timeout parameter had run out.
    assert classify(timeout, request(deadline_ns=now - 1), 0.5) is Outcome.REFUSED
    assert classify(timeout, request(timeout_us=100_000), 0.5) is Outcome.REFUSED
    # Budgets of the client's that were still running: the server's timeout came first.
    assert classify(timeout, request(deadline_ns=now + 60 * 10**9), 0.5) is Outcome.FAILED
    assert classify(timeout, request(timeout_us=2_000_000), 0.5) is Outcome.FAILED
