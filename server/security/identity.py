"""The caller of an RPC: who it is and what it may do.

The authorization guard (server/security/guard.py) sets the caller of each RPC before its
handler runs; handlers that need it (shared-memory ownership, the audit log) read it with
:func:`caller`. grpc.aio runs every RPC in its own task, so the context variable is per call.
Without an auth file every caller is :data:`ANONYMOUS`, which may do everything.
"""

from __future__ import annotations

import enum
from contextvars import ContextVar
from dataclasses import dataclass


class Role(enum.Enum):
    #: Inference, and the metadata and readiness RPCs a client needs for it.
    INFER = "infer"
    #: Statistics, the repository index, routing and drift status, metrics.
    MONITOR = "monitor"
    #: Load and unload, routing changes, shared-memory registration.
    ADMIN = "admin"


@dataclass(frozen=True, slots=True)
class Identity:
    """An authenticated caller. ``models`` None: every model; else only those names."""

    name: str
    roles: frozenset[Role]
    models: frozenset[str] | None = None
    #: How it was established: "token", "certificate", "header" or "none".
    source: str = "none"

    def may_use(self, model: str) -> bool:
        return self.models is None or model in self.models


#: The caller when no auth file is configured: every role, every model.
ANONYMOUS = Identity("anonymous", frozenset(Role), None, "none")

_CALLER: ContextVar[Identity] = ContextVar("peregrine_caller", default=ANONYMOUS)


def caller() -> Identity:
    """The identity of the RPC being handled (ANONYMOUS without authentication)."""
    return _CALLER.get()


def set_caller(identity: Identity) -> None:
    """Called by the guard at the start of each RPC (the task's own context)."""
    _CALLER.set(identity)
