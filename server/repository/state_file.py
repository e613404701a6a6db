"""The repository's durable state: which models were loaded explicitly and which versions
last served well, written atomically so a restart (or a crash mid-swap) comes back the same.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from server.atomic_file import write_atomically

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RepositoryState:
    explicit_models: set[str] = field(default_factory=set)
    #: model -> versions that were last ready together
    last_good: dict[str, list[int]] = field(default_factory=dict)
    #: model -> versions whose load has begun and not ended: still here at start, the server
    #: stopped mid-load (a crash, perhaps caused by that load)
    loading: dict[str, list[int]] = field(default_factory=dict)


class StateFile:
    def __init__(self, path: Path | None) -> None:
        self.path = path

    def load(self) -> RepositoryState:
        if self.path is None or not self.path.exists():
            return RepositoryState()
        try:
            document = json.loads(self.path.read_text(encoding="utf-8"))
            return RepositoryState(
                explicit_models=set(document.get("explicit_models", [])),
                last_good={k: [int(v) for v in vs]
                           for k, vs in document.get("last_good", {}).items()},
                loading={k: [int(v) for v in vs]
                         for k, vs in document.get("loading", {}).items()},
            )
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable state file",
                        extra={"path": str(self.path), "error": repr(exc)})
            return RepositoryState()

    def save(self, state: RepositoryState) -> None:
        """Atomically; a failure is logged, never raised (serving goes on without it)."""
        if self.path is None:
            return
        document: dict[str, object] = {
            "explicit_models": sorted(state.explicit_models),
            "last_good": {k: sorted(v) for k, v in sorted(state.last_good.items())},
        }
        if state.loading:
            document["loading"] = {k: sorted(v) for k, v in sorted(state.loading.items())}
        try:
            write_atomically(self.path, json.dumps(document, indent=2))
        except OSError as exc:
            log.warning("cannot write state file", extra={"path": str(self.path),
                                                          "error": repr(exc)})
