"""Paths taken from a model's config stay inside the model's directory.

A config (config.pbtxt, or an override a client sends with RepositoryModelLoad) names files:
the model file, warm-up data, engine and timing caches, the drift store. Each is a path
relative to a directory the server chose; :func:`confined` refuses an absolute path, a ``..``
part, a ``~`` and a symlink that leads out, so a config can never make the server read or
write elsewhere. :func:`relative_path` is the same lexical rule as a ``parameters`` parser.

:func:`hide_paths` is the other half: reasons shown to clients (RepositoryIndex, a failed
load) name files relative to the model directory, never where the server keeps them.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from server.errors import ModelLoadError

#: What a path in a config must be, completing "... must be".
RELATIVE = "a relative path (not absolute, no '..' part, no leading '~')"


def relative_path(value: str) -> str:
    """``value`` if it is a relative path that cannot climb out of its base; else ValueError
    (usable as a ``server.parameters.Key`` parser)."""
    if (not value or not value.isprintable() or value.startswith(("/", "\\", "~"))
            or ".." in PurePosixPath(value.replace("\\", "/")).parts):
        raise ValueError(RELATIVE)
    return value


def check_relative(value: str, field: str) -> str:
    """``value`` if :func:`relative_path` takes it, else ModelLoadError naming ``field``."""
    try:
        return relative_path(value)
    except ValueError:
        raise ModelLoadError(f"{field} {value!r} must be {RELATIVE}") from None


def confined(base: Path, value: str, field: str, where: str = "the model directory") -> Path:
    """``base / value`` with symlinks resolved, when it stays inside ``base`` (itself resolved);
    else ModelLoadError naming ``field``. The path need not exist."""
    check_relative(value, field)
    try:
        root = base.resolve()
        path = (base / value).resolve()
    except (OSError, RuntimeError):  # a symlink loop
        raise ModelLoadError(f"{field} {value!r} cannot be resolved (a symlink loop?)") \
            from None
    if not path.is_relative_to(root):
        raise ModelLoadError(f"{field} {value!r} leads out of {where} (through a symlink)")
    return path


def hide_paths(text: str, roots: Iterable[Path]) -> str:
    """``text`` with every path under one of ``roots`` (as given or resolved) written relative
    to it: ``/srv/models/m/1/model.onnx`` -> ``1/model.onnx``; a root itself becomes ``.``."""
    spellings: set[str] = set()
    for root in roots:
        spellings.add(str(root))
        with contextlib.suppress(OSError, RuntimeError):
            spellings.add(str(root.resolve()))
    # Longest first: a resolved root may be a prefix of the given one, or the reverse. A
    # root followed by more of a name (/srv/models/m2 for /srv/models/m) is another path.
    for spelling in sorted(spellings, key=len, reverse=True):
        pattern = re.escape(spelling) + r"(/|(?![\w-]|\.\w))"
        text = re.sub(pattern, lambda m: "" if m.group(1) else ".", text)
    return text
