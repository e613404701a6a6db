"""Version policy: which of the version directories on disk are served."""

from __future__ import annotations

from collections.abc import Iterable

from server._pb import model_config_pb2 as mc
from server.errors import ModelLoadError


def select_versions(policy: mc.ModelVersionPolicy, available: Iterable[int]) -> list[int]:
    """Versions to serve, ascending. The default policy is ``latest { num_versions: 1 }``."""
    versions = sorted(set(available))
    choice = policy.WhichOneof("policy_choice")
    if choice == "all":
        return versions
    if choice == "specific":
        wanted = sorted(set(int(v) for v in policy.specific.versions))
        missing = [v for v in wanted if v not in versions]
        if missing:
            raise ModelLoadError(f"version policy names versions {missing} that are not on disk")
        return wanted
    count = int(policy.latest.num_versions) if choice == "latest" else 1
    if count <= 0:
        raise ModelLoadError("version policy latest needs num_versions >= 1")
    return versions[-count:]
