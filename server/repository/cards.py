"""Model cards: an optional ``model_card.json`` per version (training data version,
hyperparameters, evaluation metrics, code revision, ...), flattened into string properties.
Missing is fine; malformed is a load error.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.errors import ModelLoadError
from server.parameters import Key, text

CARD_FILE = "model_card.json"

# The ModelConfig RPC serves a version's card fields and the runtime that serves it among the
# config's ``parameters``. A config taken from that RPC and loaded back (a config override)
# holds them, so they are keys a model may have; the served values take precedence.
CARD = Key("card.", text, "a model card field, served by ModelConfig (model_card.json's "
           "fields take precedence)", member="<field>")
RUNTIME = Key("runtime", text, "the runtime serving the version, served by ModelConfig (the "
              "served value replaces it)")
#: config.pbtxt ``parameters`` keys that serving a model's config adds.
PARAMETER_KEYS = (CARD, RUNTIME)


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, inner in value.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"keys must be non-empty strings, got {key!r}")
            _flatten(f"{prefix}.{key}" if prefix else key, inner, out)
    elif isinstance(value, list):
        out[prefix] = json.dumps(value)
    elif isinstance(value, bool):
        out[prefix] = "true" if value else "false"
    elif value is None:
        out[prefix] = ""
    else:
        out[prefix] = str(value)


def read_card(version_dir: Path) -> dict[str, str]:
    """The card of one version as ``card.<dotted key>`` -> text; empty when there is none."""
    path = version_dir / CARD_FILE
    if not path.exists():
        return {}
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model card {path} is malformed: {exc}") from None
    if not isinstance(document, dict):
        raise ModelLoadError(f"model card {path} must hold a JSON object")
    flat: dict[str, str] = {}
    try:
        _flatten(CARD.name.rstrip("."), document, flat)
    except ValueError as exc:
        raise ModelLoadError(f"model card {path}: {exc}") from None
    return flat
