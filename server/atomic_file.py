"""Files replaced whole or not at all: a crash mid-write never leaves a torn file behind."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from pathlib import Path


def replace_atomically(path: Path, write: Callable[[Path], None], durable: bool = True) -> None:
    """Let ``write`` fill a temporary file beside ``path``, fsync it (unless ``durable`` is
    False), then rename it over ``path``. The parent directory is created if missing; the
    temporary file is removed when anything fails."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        if durable:
            with open(tmp, "rb") as handle:
                os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomically(path: Path, data: bytes | memoryview | str, durable: bool = True) -> None:
    """``replace_atomically`` with the whole content at hand (text as UTF-8)."""
    payload = data.encode("utf-8") if isinstance(data, str) else data

    def write(tmp: Path) -> None:
        tmp.write_bytes(payload)

    replace_atomically(path, write, durable)
