"""Routing tables on disk: ``routing.json`` beside a model's config.pbtxt, written atomically."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from google.protobuf import json_format

from server._pb import admin_pb2 as admin
from server.errors import InvalidInput

ROUTING_FILE = "routing.json"


class RouteStore:
    def __init__(self, locate: Callable[[str], Path]) -> None:
        """``locate(model)`` gives the model's directory."""
        self._locate = locate
        self._seen: dict[str, int] = {}

    def path(self, model: str) -> Path:
        return self._locate(model) / ROUTING_FILE

    def read(self, model: str) -> admin.RouteTable | None:
        path = self.path(model)
        try:
            stat = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._seen.pop(model, None)
            return None
        self._seen[model] = stat.st_mtime_ns
        table = admin.RouteTable()
        try:
            json_format.Parse(text, table)
        except json_format.ParseError as exc:
            raise InvalidInput(f"{path}: {exc}") from None
        if table.model and table.model != model:
            raise InvalidInput(f"{path}: names model '{table.model}', not '{model}'")
        table.model = model
        return table

    def changed(self, model: str) -> bool:
        """True when the file appeared, vanished or was rewritten since the last read/write."""
        try:
            mtime = self.path(model).stat().st_mtime_ns
        except FileNotFoundError:
            return model in self._seen
        return self._seen.get(model) != mtime

    def write(self, table: admin.RouteTable) -> None:
        path = self.path(table.model)
        text = json_format.MessageToJson(table, indent=2, preserving_proto_field_name=True)
        fd, tmp = tempfile.mkstemp(prefix=".routing-", dir=path.parent)
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self._seen[table.model] = path.stat().st_mtime_ns

    def remove(self, model: str) -> None:
        self.path(model).unlink(missing_ok=True)
        self._seen.pop(model, None)
