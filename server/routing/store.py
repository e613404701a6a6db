"""Routing tables on disk: ``routing.json`` beside a model's config.pbtxt, written atomically.

The file keeps the admin API's JSON form of a RouteTable (field names as in admin.proto, the
protobuf JSON mapping's camelCase spellings accepted too), so files written by earlier
releases and by hand both read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from server.atomic_file import write_atomically
from server.errors import InvalidInput
from server.routing.table import Canary, RouteTable, Shadow, Variant
from server.security.names import check_model_name

ROUTING_FILE = "routing.json"


class RouteStore:
    def __init__(self, locate: Callable[[str], Path]) -> None:
        """``locate(model)`` gives the model's directory."""
        self._locate = locate
        self._seen: dict[str, int] = {}

    def path(self, model: str) -> Path:
        return self._locate(check_model_name(model)) / ROUTING_FILE

    def read(self, model: str) -> RouteTable | None:
        path = self.path(model)
        try:
            stat = path.stat()
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            self._seen.pop(model, None)
            return None
        self._seen[model] = stat.st_mtime_ns
        try:
            table = table_from_json(json.loads(text))
        except (ValueError, InvalidInput) as exc:
            raise InvalidInput(f"{path}: {exc}") from None
        if table.model and table.model != model:
            raise InvalidInput(f"{path}: names model '{table.model}', not '{model}'")
        return RouteTable(model, table.variants, table.shadow, table.canary,
                          table.sticky_parameter)

    def changed(self, model: str) -> bool:
        """True when the file appeared, vanished or was rewritten since the last read/write."""
        try:
            mtime = self.path(model).stat().st_mtime_ns
        except FileNotFoundError:
            return model in self._seen
        return self._seen.get(model) != mtime

    def write(self, table: RouteTable) -> None:
        path = self.path(table.model)
        write_atomically(path, json.dumps(table_to_json(table), indent=2) + "\n")
        self._seen[table.model] = path.stat().st_mtime_ns

    def remove(self, model: str) -> None:
        self.path(model).unlink(missing_ok=True)
        self._seen.pop(model, None)


def table_to_json(table: RouteTable) -> dict[str, Any]:
    """The JSON document of ``table``; empty and zero fields left out, as protobuf does."""
    return _object(table)


def _object(value: Any) -> dict[str, Any]:
    document: dict[str, Any] = {}
    for field in fields(value):
        item = getattr(value, field.name)
        if item is None or item == "" or item == 0 or item == ():
            continue
        if isinstance(item, tuple):
            document[field.name] = [_object(v) if hasattr(v, "__dataclass_fields__") else v
                                    for v in item]
        elif hasattr(item, "__dataclass_fields__"):
            document[field.name] = _object(item)
        else:
            document[field.name] = item
    return document


def table_from_json(document: object) -> RouteTable:
    """Parse a routing table document; InvalidInput names the field that is wrong."""
    fields_ = _fields(document, "table", ("model", "variants", "shadow", "canary",
                                          "sticky_parameter"))
    variants = fields_.get("variants", [])
    if not isinstance(variants, list):
        raise InvalidInput("'variants' must be a list")
    shadow = None
    if "shadow" in fields_:
        raw = _fields(fields_["shadow"], "shadow", ("target", "fraction", "max_pending",
                                                    "max_pending_bytes"))
        shadow = Shadow(
            target=_variant(raw.get("target", {}), "shadow target"),
            fraction=_number(raw, "fraction", "shadow"),
            max_pending=_count(raw, "max_pending", "shadow"),
            max_pending_bytes=_count(raw, "max_pending_bytes", "shadow"),
        )
    canary = None
    if "canary" in fields_:
        raw = _fields(fields_["canary"], "canary", (
            "baseline", "candidate", "steps", "step_interval_secs",
            "max_error_rate_increase", "max_p99_ratio", "min_requests"))
        steps = raw.get("steps", [])
        if not isinstance(steps, list):
            raise InvalidInput("canary 'steps' must be a list of numbers")
        canary = Canary(
            baseline=_text(raw, "baseline", "canary"),
            candidate=_text(raw, "candidate", "canary"),
            steps=tuple(_number({"step": s}, "step", "canary steps") for s in steps),
            step_interval_secs=_number(raw, "step_interval_secs", "canary"),
            max_error_rate_increase=_number(raw, "max_error_rate_increase", "canary"),
            max_p99_ratio=_number(raw, "max_p99_ratio", "canary"),
            min_requests=_count(raw, "min_requests", "canary"),
        )
    return RouteTable(
        model=_text(fields_, "model", "table"),
        variants=tuple(_variant(v, f"variant {i}") for i, v in enumerate(variants)),
        shadow=shadow,
        canary=canary,
        sticky_parameter=_text(fields_, "sticky_parameter", "table"),
    )


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.capitalize() for part in rest)


def _fields(document: object, where: str, names: tuple[str, ...]) -> Mapping[str, object]:
    """The object's fields by their snake_case names; unknown fields are an error."""
    if not isinstance(document, dict):
        raise InvalidInput(f"{where} must be a JSON object")
    spellings = {spelling: name for name in names for spelling in (name, _camel(name))}
    found: dict[str, object] = {}
    for key, value in document.items():
        name = spellings.get(key)
        if name is None:
            raise InvalidInput(f"{where} has an unknown field '{key}'; known: {list(names)}")
        found[name] = value
    return found


def _variant(document: object, where: str) -> Variant:
    raw = _fields(document, where, ("name", "model", "version", "weight"))
    return Variant(name=_text(raw, "name", where), model=_text(raw, "model", where),
                   version=_text(raw, "version", where), weight=_number(raw, "weight", where))


def _text(raw: Mapping[str, object], name: str, where: str) -> str:
    value = raw.get(name, "")
    if not isinstance(value, str):
        raise InvalidInput(f"{where} '{name}' must be a string")
    return value


def _number(raw: Mapping[str, object], name: str, where: str) -> float:
    value = raw.get(name, 0.0)
    if isinstance(value, str) and value in ("NaN", "Infinity", "-Infinity"):
        return float(value)  # how protobuf's JSON spells the non-finite doubles
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidInput(f"{where} '{name}' must be a number")
    return float(value)


def _count(raw: Mapping[str, object], name: str, where: str) -> int:
    value = raw.get(name, 0)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    elif isinstance(value, str) and value.isdigit():
        value = int(value)  # how protobuf's JSON spells a 64-bit integer
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{where} '{name}' must be a whole number >= 0")
    return value
