"""Classification labels: the file an output's ``label_filename`` names, read at load.

The file lies in the model's directory (beside config.pbtxt, as in Triton); the name is a
path relative to it that cannot lead out (``security/paths.confined``), so a config or a
client's override never makes the server read another file. Each line is one label, the
first line class 0 (lines are split on '\\n' only, as Triton reads them). Labels stay bytes:
they are written into BYTES answers as they are.
"""

from __future__ import annotations

import dataclasses
import os
import stat
from pathlib import Path
from types import MappingProxyType

from server.errors import ModelLoadError
from server.security.paths import confined
from server.spec import ModelSpec

#: The largest label file read (an ImageNet label file is about 20 KB).
MAX_LABEL_FILE_BYTES = 8 << 20


def split_labels(content: bytes) -> tuple[bytes, ...]:
    """The lines of a label file; a final newline ends the last line, it adds none."""
    lines = content.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    return tuple(lines)


def _read(path: Path, field: str, name: str) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ModelLoadError(f"{field} '{name}' cannot be read: {exc.strerror}") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise ModelLoadError(f"{field} '{name}' is not a file")
        chunks = []
        size, left = info.st_size, MAX_LABEL_FILE_BYTES + 1
        while size <= MAX_LABEL_FILE_BYTES and left and (chunk := os.read(fd, left)):
            chunks.append(chunk)
            left -= len(chunk)
            size = MAX_LABEL_FILE_BYTES + 1 - left
        if size > MAX_LABEL_FILE_BYTES:
            raise ModelLoadError(f"{field} '{name}' holds more than {MAX_LABEL_FILE_BYTES} "
                                 "bytes, the limit")
        return b"".join(chunks)
    finally:
        os.close(fd)


def with_labels(spec: ModelSpec, model_dir: Path) -> ModelSpec:
    """``spec`` with the labels of every output that names a label file (blocking: the
    loader threads call it)."""
    labels = {}
    for output in spec.outputs:
        if output.label_filename:
            field = f"model '{spec.name}' output '{output.name}' label_filename"
            path = confined(model_dir, output.label_filename, field)
            labels[output.name] = split_labels(_read(path, field, output.label_filename))
    if not labels:
        return spec
    return dataclasses.replace(spec, labels=MappingProxyType(labels))
