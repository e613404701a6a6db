"""Typed errors. Each carries the gRPC status it maps to; the frontend maps them in one place."""

from __future__ import annotations

import secrets

import grpc


def correlation_id() -> str:
    """A short random id that ties an error a client sees to the server's log line, which
    holds what the client must not see (the exception, paths, the backend's own message)."""
    return secrets.token_hex(8)


class PeregrineError(Exception):
    """Base of every error that is answered to a client rather than crashing."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    #: Triton's failure reason label for nv_inference_request_failure.
    reason: str = "OTHER"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidInput(PeregrineError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(PeregrineError):
    code = grpc.StatusCode.NOT_FOUND


class ModelNotReady(PeregrineError):
    code = grpc.StatusCode.UNAVAILABLE


class Overloaded(PeregrineError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "REJECTED"


class BoundExceeded(Overloaded):
    """Past one of the server's bounds: a flag (``--max-inflight-requests``...) or a model's
    ``max_queue_size``. ``bound`` names it, for the refusal counter and the message."""

    def __init__(self, bound: str, message: str) -> None:
        super().__init__(message)
        self.bound = bound


class DeadlineExceeded(PeregrineError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED
    reason = "REJECTED"


class ExecutionTimedOut(DeadlineExceeded):
    """A batch overran its model's execution timeout (a backend failure, not a rejection)."""

    reason = "BACKEND"


class Cancelled(PeregrineError):
    code = grpc.StatusCode.CANCELLED
    reason = "CANCELED"


class BackendError(PeregrineError):
    code = grpc.StatusCode.INTERNAL
    reason = "BACKEND"


class ModelError(PeregrineError):
    """An error a model's own code reported (a Python model's TritonError, or what its execute
    raised): its message is the model author's, answered as is, with the status the model
    chose (INTERNAL unless it said otherwise)."""

    reason = "BACKEND"

    def __init__(self, message: str, code: grpc.StatusCode = grpc.StatusCode.INTERNAL) -> None:
        super().__init__(message)
        self.code = code


class InstanceUnavailable(PeregrineError):
    """The model instance that ran the request cannot serve right now (its model process died
    and is being replaced): UNAVAILABLE, so a client may retry."""

    code = grpc.StatusCode.UNAVAILABLE
    reason = "BACKEND"


class Unsupported(PeregrineError):
    code = grpc.StatusCode.UNIMPLEMENTED


class NotAllowed(PeregrineError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class LoadFailed(PeregrineError):
    """An explicit load request that left no version of the model ready (or kept old ones)."""

    code = grpc.StatusCode.INTERNAL


class ModelLoadError(Exception):
    """A model or version could not be loaded; the reason is shown in RepositoryIndex."""


class Unauthenticated(PeregrineError):
    """No credentials, or credentials that match no identity."""

    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "REJECTED"


class PermissionDenied(PeregrineError):
    """An authenticated caller without the role or the model the call needs."""

    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "REJECTED"


class RateLimited(Overloaded):
    """Over a rate limit; ``retry_after_ms`` is when the next request would be admitted."""

    def __init__(self, message: str, retry_after_ms: int) -> None:
        super().__init__(message)
        self.retry_after_ms = retry_after_ms
