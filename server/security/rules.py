"""Which role each RPC needs, its Triton protocol group, and whether it is a control action.

One table over every RPC the server offers; a test checks that every method of every service
has its rule, so a new RPC cannot slip in unguarded. A caller needs one of ``roles``; an
empty set means open to everyone (probes).
"""

from __future__ import annotations

from dataclasses import dataclass

from server.security.identity import Role

INFERENCE = "inference.GRPCInferenceService"
ADMIN = "peregrine.admin.v1.PeregrineAdmin"
HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"

#: Triton's --grpc-restricted-protocol groups (ours: routing under model-repository, drift
#: under statistics).
GROUPS = frozenset({"health", "metadata", "inference", "shared-memory", "model-config",
                    "model-repository", "statistics", "trace", "logging"})


@dataclass(frozen=True, slots=True)
class Rule:
    roles: frozenset[Role]
    #: Triton's protocol group (--grpc-restricted-protocol), None for health and reflection.
    group: str | None = None
    #: A control action: recorded in the audit log with its outcome.
    audited: bool = False
    #: The request field naming the model the call concerns (a token limited to some models
    #: may only name those; empty means "all models", refused to such a token).
    model_field: str | None = None
    #: Inference: per-request model and rate checks happen on each request (streams too).
    inference: bool = False


OPEN = frozenset[Role]()
_INFER = frozenset({Role.INFER})
_READ = frozenset({Role.INFER, Role.MONITOR, Role.ADMIN})
_MONITOR = frozenset({Role.MONITOR, Role.ADMIN})
_ADMIN = frozenset({Role.ADMIN})

RULES: dict[str, Rule] = {
    # Probes stay open.
    f"/{INFERENCE}/ServerLive": Rule(OPEN, "health"),
    f"/{INFERENCE}/ServerReady": Rule(OPEN, "health"),
    f"/{HEALTH}/Check": Rule(OPEN),
    f"/{HEALTH}/Watch": Rule(OPEN),
    # What an inference client needs before and while it infers.
    f"/{INFERENCE}/ModelReady": Rule(_READ, "health", model_field="name"),
    f"/{INFERENCE}/ServerMetadata": Rule(_READ, "metadata"),
    f"/{INFERENCE}/ModelMetadata": Rule(_READ, "metadata", model_field="name"),
    f"/{INFERENCE}/ModelConfig": Rule(_READ, "model-config", model_field="name"),
    f"/{INFERENCE}/ModelInfer": Rule(_INFER, "inference", inference=True),
    f"/{INFERENCE}/ModelStreamInfer": Rule(_INFER, "inference", inference=True),
    # Monitoring.
    f"/{INFERENCE}/ModelStatistics": Rule(_MONITOR, "statistics", model_field="name"),
    f"/{INFERENCE}/RepositoryIndex": Rule(_MONITOR, "model-repository", model_field=""),
    f"/{ADMIN}/GetRoute": Rule(_MONITOR, "model-repository", model_field="model"),
    f"/{ADMIN}/ListRoutes": Rule(_MONITOR, "model-repository", model_field=""),
    f"/{ADMIN}/GetDrift": Rule(_MONITOR, "statistics", model_field="model"),
    # Control actions.
    f"/{INFERENCE}/RepositoryModelLoad": Rule(_ADMIN, "model-repository", True, "model_name"),
    f"/{INFERENCE}/RepositoryModelUnload": Rule(_ADMIN, "model-repository", True,
                                                "model_name"),
    f"/{ADMIN}/SetRoute": Rule(_ADMIN, "model-repository", True, "table.model"),
    f"/{ADMIN}/ClearRoute": Rule(_ADMIN, "model-repository", True, "model"),
    f"/{ADMIN}/Promote": Rule(_ADMIN, "model-repository", True, "model"),
    f"/{ADMIN}/Rollback": Rule(_ADMIN, "model-repository", True, "model"),
    f"/{INFERENCE}/SystemSharedMemoryStatus": Rule(_ADMIN, "shared-memory"),
    f"/{INFERENCE}/SystemSharedMemoryRegister": Rule(_ADMIN, "shared-memory", True),
    f"/{INFERENCE}/SystemSharedMemoryUnregister": Rule(_ADMIN, "shared-memory", True),
    f"/{INFERENCE}/CudaSharedMemoryStatus": Rule(_ADMIN, "shared-memory"),
    f"/{INFERENCE}/CudaSharedMemoryRegister": Rule(_ADMIN, "shared-memory", True),
    f"/{INFERENCE}/CudaSharedMemoryUnregister": Rule(_ADMIN, "shared-memory", True),
    f"/{INFERENCE}/TraceSetting": Rule(_ADMIN, "trace", True),
    f"/{INFERENCE}/LogSettings": Rule(_ADMIN, "logging", True),
    # Reflection answers every caller, listing only what the caller may call.
    f"/{REFLECTION}/ServerReflectionInfo": Rule(OPEN),
}


def rule_of(method: str) -> Rule:
    """The rule of a full method name (/package.Service/Method); an RPC without one is a bug
    in this table, so it is refused to everyone but admins rather than left open."""
    return RULES.get(method, Rule(_ADMIN, None, True))


def service_roles(service: str) -> frozenset[Role] | None:
    """The roles that may call a guarded method of ``service`` (reflection advertises the
    service to them): OPEN for a service whose every method is open, None for one without
    rules. The inference service's open probes do not make it open: probes have the health
    service."""
    prefix = f"/{service}/"
    rules = [rule for method, rule in RULES.items() if method.startswith(prefix)]
    if not rules:
        return None
    if all(not rule.roles for rule in rules):
        return OPEN
    return frozenset().union(*(rule.roles for rule in rules))


def parse_restrictions(specs: tuple[str, ...]) -> dict[str, tuple[str, str]]:
    """Triton's ``GROUP[,GROUP...]:KEY=VALUE`` items -> group -> (header, value)."""
    restricted: dict[str, tuple[str, str]] = {}
    for spec in specs:
        groups, colon, header = spec.partition(":")
        key, equals, value = header.partition("=")
        key = key.strip().lower()
        if not colon or not equals or not key or not groups.strip():
            raise ValueError(f"grpc_restricted_protocol: expected GROUPS:KEY=VALUE, got "
                             f"'{spec}'")
        for group in (g.strip() for g in groups.split(",")):
            if group not in GROUPS:
                raise ValueError(f"grpc_restricted_protocol: unknown group '{group}' (one of "
                                 f"{', '.join(sorted(GROUPS))})")
            if group in restricted:
                raise ValueError(f"grpc_restricted_protocol: group '{group}' is restricted "
                                 "twice")
            restricted[group] = (key, value)
    return restricted
