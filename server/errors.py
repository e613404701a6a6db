"""Typed errors. Each carries the gRPC status it maps to; the frontend maps them in one place."""

from __future__ import annotations

import secrets
from typing import TYPE_CHECKING

import grpc

if TYPE_CHECKING:
    from server.types import DataType


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


# -- Triton's wording ------------------------------------------------------------------------
# Programs written against Triton test some errors by their text, so these start with the
# phrase Triton answers (its core prefixes every failed model lookup with "Request for
# unknown model: ", then says "'<name>' is not found", "'<name>' version <n> is not found",
# "... has no available versions" or "... version <n> is not at ready state"; a failed load
# is "load failed for model '<name>': <reason>"). Peregrine's own detail follows the phrase.

UNKNOWN_MODEL = "Request for unknown model: "


def _detail(why: str) -> str:
    return f": {why}" if why else ""


def unknown_model(name: str) -> ModelNotFound:
    return ModelNotFound(f"{UNKNOWN_MODEL}'{name}' is not found")


def unknown_version(name: str, version: str) -> ModelNotFound:
    return ModelNotFound(f"{UNKNOWN_MODEL}'{name}' version {version} is not found")


def no_available_version(name: str, why: str = "",
                         error: type[PeregrineError] = ModelNotReady) -> PeregrineError:
    """UNAVAILABLE by default; ``error`` ModelNotFound for a model that never loaded."""
    return error(f"{UNKNOWN_MODEL}'{name}' has no available versions{_detail(why)}")


def version_not_ready(name: str, version: str, why: str = "") -> ModelNotReady:
    return ModelNotReady(
        f"{UNKNOWN_MODEL}'{name}' version {version} is not at ready state{_detail(why)}")


def byte_size_mismatch(model: str, name: str, datatype: DataType, shape: tuple[int, ...],
                       expected: int, got: int, where: str) -> InvalidInput:
    """An input whose bytes (``where``: raw content, shared_memory_byte_size) are not what its
    shape and datatype need."""
    return InvalidInput(
        f"input byte size mismatch for input '{name}' for model '{model}'. Expected "
        f"{expected}, got {got} ({where} of {got} bytes; shape {list(shape)} of "
        f"{datatype.wire} needs {expected})")


def load_failed(name: str, why: str) -> LoadFailed:
    """A RepositoryModelLoad that left the model without what it asked."""
    return LoadFailed(f"load failed for model '{name}': {why}")


def not_in_repository(name: str, why: str) -> ModelNotFound:
    """A RepositoryModelLoad of a model the repository does not hold."""
    return ModelNotFound(f"failed to load '{name}', failed to poll from model repository: {why}")


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
