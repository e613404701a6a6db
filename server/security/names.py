"""The one rule for names that become a single file-system path component.

A model name is a directory of the repository (``<repository>/<name>``), a directory of the
MLflow cache and a directory of the drift store, so a name that could leave its parent
(``..``, a separator, an absolute path) or confuse a log line (control characters) is refused
before anything looks at the disk. The message never depends on what exists on disk, and
never echoes the name: the caller knows what it sent, and a log line carries it escaped.
"""

from __future__ import annotations

from server.errors import InvalidInput

#: The longest name accepted, in bytes of UTF-8: what file systems allow for one component
#: (a longer one would fail inside the server, not answer INVALID_ARGUMENT).
MAX_NAME_BYTES = 255


def check_name(name: str, what: str) -> str:
    """``name`` if it is one safe path component, else InvalidInput saying why; ``what``
    says what the name is ("model name", "artifact name")."""
    if not name:
        raise InvalidInput(f"{what} is empty")
    if not name.isprintable():  # first: a printable str encodes (no lone surrogates)
        raise InvalidInput(f"{what} holds a control or other non-printable character")
    size = len(name.encode())
    if size > MAX_NAME_BYTES:
        raise InvalidInput(f"{what} is {size} bytes long (UTF-8); the limit is "
                           f"{MAX_NAME_BYTES}")
    if "/" in name or "\\" in name:
        raise InvalidInput(f"{what} holds a path separator ('/' or '\\')")
    if ".." in name or name.startswith("."):
        raise InvalidInput(f"{what} holds '..' or starts with '.'")
    return name


def check_model_name(name: str) -> str:
    """``name`` if it may name a model, else InvalidInput (INVALID_ARGUMENT)."""
    return check_name(name, "model name")
