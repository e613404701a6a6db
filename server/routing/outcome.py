"""Whose fault a routed request's failure was: only the server's count against its variant.

A canary judges its candidate by the error rate. Were a client's own mistakes counted, any
client could force a rollback by sending bad requests to the candidate (with a sticky key
that lands there), or hold a healthy rollout back. So a failure counts against a variant
only when the server caused it: INTERNAL (a backend or server fault), UNAVAILABLE (the
variant's version is not serving), and a timeout the server imposed (the model's queue
policy or execution timeout). Everything else is the client's doing and is not judged:
INVALID_ARGUMENT, NOT_FOUND, PERMISSION_DENIED, UNAUTHENTICATED, RESOURCE_EXHAUSTED (a rate
limit, or a queue the client's own burst filled), CANCELLED, UNIMPLEMENTED,
FAILED_PRECONDITION, and a DEADLINE_EXCEEDED that came when the client's own deadline or
``timeout`` parameter had run out.

Classified by gRPC status code (the ``code`` every typed error carries), so an error class
added later is classified by what it answers, without a list of classes here.
"""

from __future__ import annotations

import enum
import time

import grpc

from server.errors import PeregrineError
from server.types import InferRequest

SERVER_FAULTS = frozenset({grpc.StatusCode.INTERNAL, grpc.StatusCode.UNAVAILABLE})


class Outcome(enum.Enum):
    OK = "ok"
    #: The server's fault: counts against the variant.
    FAILED = "failed"
    #: The client's doing: counted apart, never judged.
    REFUSED = "refused"


def classify(error: BaseException, request: InferRequest, seconds: float) -> Outcome:
    """The outcome of a routed request that failed with ``error`` after ``seconds``."""
    if not isinstance(error, PeregrineError):
        return Outcome.FAILED  # an untyped error is a server fault, answered as INTERNAL
    if error.code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Outcome.REFUSED if _client_budget_spent(request, seconds) else Outcome.FAILED
    return Outcome.FAILED if error.code in SERVER_FAULTS else Outcome.REFUSED


def _client_budget_spent(request: InferRequest, seconds: float) -> bool:
    """True when the client's gRPC deadline or its ``timeout`` parameter has run out: the
    scheduler enforces the earliest of those and the model's own timeout, so a request that
    expired before either of the client's did was cut by the server's timeout."""
    if request.deadline_ns is not None and time.perf_counter_ns() >= request.deadline_ns:
        return True
    return bool(request.timeout_us) and seconds * 1e6 >= request.timeout_us
