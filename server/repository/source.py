"""Model sources: where model directories come from (the filesystem is the embedded default)."""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import AsyncIterator
from pathlib import Path

from server.errors import InvalidInput, ModelLoadError, ModelNotFound
from server.repository.cards import CARD_FILE
from server.repository.model_config import CONFIG_FILE
from server.security.names import check_model_name

log = logging.getLogger(__name__)


class FilesystemSource:
    """A Triton-layout directory. Publishing a version atomically: write it under a name that
    starts with '.' (ignored) and rename it into place.

    A name is checked (server/security/names.py) before a path is built from it; directories
    whose names are not model names are not listed (those starting with '.' silently, others
    with one warning each).
    """

    def __init__(self, root: Path) -> None:
        self.root = root
        self._refused: set[str] = set()

    def list(self) -> list[str]:
        if not self.root.is_dir():
            raise ModelLoadError(f"model repository '{self.root}' is not a directory")
        names = []
        for entry in self.root.iterdir():
            if not entry.is_dir() or entry.name.startswith("."):
                continue
            try:
                names.append(check_model_name(entry.name))
            except InvalidInput as exc:
                if entry.name not in self._refused:
                    self._refused.add(entry.name)
                    log.warning("repository directory is not a model name; not served",
                                extra={"directory": entry.name, "reason": exc.message})
        return sorted(names)

    def fetch(self, name: str) -> Path:
        path = self.root / check_model_name(name)
        if not path.is_dir():
            raise ModelNotFound(f"model '{name}' is not in the repository")
        return path

    async def watch(self) -> AsyncIterator[None]:
        """File-system events (inotify, FSEvents, ...) under the root, debounced."""
        from watchfiles import awatch

        root = str(self.root)

        def published(_change: object, path: str) -> bool:
            # Dot-prefixed paths are staging areas and server-owned stores (.drift, state
            # files); what matters appears when they are renamed into place.
            relative = os.path.relpath(path, root)
            return not any(part.startswith(".") for part in relative.split(os.sep))

        async for _changes in awatch(self.root, watch_filter=published, debounce=200, step=50,
                                     recursive=True):
            yield None

    def fingerprint(self, name: str) -> str:
        """Changes whenever the config, a version directory, a model file or a card changes."""
        digest = hashlib.sha256()
        model_dir = self.root / check_model_name(name)
        for path in sorted(_watched_files(model_dir)):
            try:
                stat = path.stat()
            except OSError:
                continue
            digest.update(f"{path.relative_to(model_dir)}:{stat.st_size}:{stat.st_mtime_ns};"
                          .encode())
        return digest.hexdigest()


def _watched_files(model_dir: Path) -> list[Path]:
    files = [model_dir / CONFIG_FILE]
    try:
        entries = list(os.scandir(model_dir))
    except OSError:
        return files
    for entry in entries:
        if entry.is_dir() and entry.name.isdigit():
            version_dir = Path(entry.path)
            files.append(version_dir)
            try:
                files.extend(
                    version_dir / child.name for child in os.scandir(version_dir)
                    if child.is_file() or child.name == CARD_FILE
                )
            except OSError:
                continue
    return files
