"""The repository's durable state: which models were loaded explicitly and which versions
last served well, written atomically so a restart (or a crash mid-swap) comes back the same.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(slots=True)
class RepositoryState:
    explicit_models: set[str] = field(default_factory=set)
    #: model -> versions that were last ready together
    last_good: dict[str, list[int]] = field(default_factory=dict)


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
            )
        except (OSError, ValueError, TypeError, AttributeError) as exc:
            log.warning("ignoring unreadable state file",
                        extra={"path": str(self.path), "error": repr(exc)})
            return RepositoryState()

    def save(self, state: RepositoryState) -> None:
        """Write to a temporary file beside the target, fsync, then rename over it."""
        if self.path is None:
            return
        document = {
            "explicit_models": sorted(state.explicit_models),
            "last_good": {k: sorted(v) for k, v in sorted(state.last_good.items())},
        }
        tmp: str | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".state-", dir=self.path.parent)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(document, handle, indent=2)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
            tmp = None
        except OSError as exc:
            log.warning("cannot write state file", extra={"path": str(self.path),
                                                          "error": repr(exc)})
        finally:
            if tmp is not None:  # failed before the rename: leave no partial file behind
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
