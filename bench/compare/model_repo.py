"""Model repositories for the comparisons, derived from the example repository.

Each comparison serves the latest version of each model with the same ONNX Runtime thread
settings on every server (:data:`ORT_PARAMETERS`), and ours with dynamic batching on (the
example config's settings) or off (its ``dynamic_batching`` block removed). The config is
edited as text so every other field stays as the example has it.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench.loadgen.environment import REPO_ROOT

EXAMPLES = REPO_ROOT / "examples" / "models"

#: ONNX Runtime settings every server in a comparison uses: one intra-op thread, no spinning.
ORT_PARAMETERS: dict[str, str] = {"intra_op_thread_count": "1", "allow_spinning": "0"}


@dataclass(frozen=True)
class ModelBatching:
    """The example config's batching: the largest batch and the longest wait for one."""

    max_batch_size: int
    max_queue_delay_us: int
    dynamic_batching: bool


def ensure_examples(models: Sequence[str]) -> Path:
    """The example repository, built with examples/build_models.py if a model is missing."""
    if not all((EXAMPLES / name / "config.pbtxt").is_file() for name in models):
        subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "build_models.py")],
                       check=True, cwd=REPO_ROOT)
    return EXAMPLES


def latest_version(model_dir: Path) -> Path:
    versions = [p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    if not versions:
        raise FileNotFoundError(f"{model_dir} has no version directory")
    return max(versions, key=lambda p: int(p.name))


def model_file(repository: Path, model: str) -> Path:
    return latest_version(repository / model) / "model.onnx"


def remove_block(text: str, field: str) -> str:
    """``text`` without the ``field { ... }`` block (nested braces matched)."""
    match = re.search(rf"^\s*{re.escape(field)}\s*:?\s*{{", text, flags=re.MULTILINE)
    if match is None:
        return text
    depth, index = 0, match.end() - 1
    while index < len(text):
        if text[index] == "{":
            depth += 1
        elif text[index] == "}":
            depth -= 1
            if depth == 0:
                break
        index += 1
    end = text.find("\n", index)
    return text[:match.start()] + ("\n" if match.start() else "") + (
        text[end + 1:] if end != -1 else "")


def set_parameters(text: str, parameters: Mapping[str, str]) -> str:
    """Replace or add ``parameters { key: ... }`` entries (one line each, as Triton writes)."""
    for key, value in parameters.items():
        pattern = re.compile(
            rf'^parameters\s*{{\s*key:\s*"{re.escape(key)}".*$\n?', flags=re.MULTILINE)
        text = pattern.sub("", text)
        text = text.rstrip("\n") + (
            f'\nparameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n')
    return text


def batching_of(config_text: str) -> ModelBatching:
    size = re.search(r"^max_batch_size:\s*(\d+)", config_text, flags=re.MULTILINE)
    delay = re.search(r"max_queue_delay_microseconds:\s*(\d+)", config_text)
    return ModelBatching(
        max_batch_size=int(size.group(1)) if size else 0,
        max_queue_delay_us=int(delay.group(1)) if delay else 0,
        dynamic_batching=re.search(r"^\s*dynamic_batching\s*{", config_text,
                                   flags=re.MULTILINE) is not None,
    )


def comparison_repository(source: Path, dest: Path, models: Sequence[str], batching: bool,
                          parameters: Mapping[str, str] = ORT_PARAMETERS) -> Path:
    """Write ``dest``: the latest version of each model, with ``parameters`` and batching."""
    if dest.exists():
        shutil.rmtree(dest)
    for name in models:
        text = (source / name / "config.pbtxt").read_text(encoding="utf-8")
        text = re.sub(r"^version_policy:.*\n", "", text, flags=re.MULTILINE)
        if not batching:
            text = remove_block(text, "dynamic_batching")
        text = set_parameters(text, parameters)
        version = latest_version(source / name)
        shutil.copytree(version, dest / name / version.name)
        (dest / name / "config.pbtxt").write_text(text, encoding="utf-8")
    return dest
