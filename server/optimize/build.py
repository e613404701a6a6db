"""One optimisation end to end: the new version staged beside the source, made, measured
against the source on the same rows and threads, described by its model card, then
published under its number in one rename (a polling server never sees half a version)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import onnxruntime as ort

from server.optimize import data, measure, methods
from server.repository.cards import CARD_FILE
from server.spec import ModelSpec
from server.types import Array

ONNX_BACKEND = "onnxruntime"
BATCHES = (1, 32)


@dataclass(frozen=True, slots=True)
class Request:
    repository: Path
    spec: ModelSpec
    version: str
    method: str
    new_version: str = ""
    calibration: Path | None = None
    eval: Path | None = None
    labels: Path | None = None
    threads: int = 1
    batches: Sequence[int] = BATCHES


@dataclass(frozen=True, slots=True)
class Figures:
    version: str
    size_bytes: int
    speeds: list[measure.Speed]
    #: On the labelled set; None without labels.
    accuracy: float | None


@dataclass(frozen=True, slots=True)
class Report:
    model: str
    method: str
    source: Figures
    candidate: Figures
    comparison: measure.Comparison
    evaluation: str
    calibration: str
    threads: int
    path: str
    created: str = field(default="")

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def next_version(model_dir: Path) -> str:
    numbers = [int(p.name) for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()]
    return str(max(numbers, default=0) + 1)


def run(request: Request) -> Report:
    spec = request.spec
    if spec.backend != ONNX_BACKEND:
        raise ValueError(f"model '{spec.name}' is served by '{spec.backend}'; optimize takes "
                         "ONNX models (platform onnxruntime_onnx)")
    model_dir = request.repository / spec.name
    source_dir = model_dir / request.version
    source = source_dir / spec.default_model_filename
    if not source.is_file():
        raise ValueError(f"model '{spec.name}' version '{request.version}' has no {source}")
    version = request.new_version or next_version(model_dir)
    if not version.isdigit() or int(version) < 1:
        raise ValueError(f"--new-version must be a positive number, got '{version}'")
    if (model_dir / version).exists():
        raise ValueError(f"version {version} of '{spec.name}' exists already")

    calibration, calibration_source = _calibration(request)
    rows, evaluation = _evaluation(request, calibration)
    labels = data.labels(request.labels) if request.labels is not None \
        else data.labels_beside(request.eval) if request.eval is not None else None

    staging = model_dir / f".optimize-{version}"
    shutil.rmtree(staging, ignore_errors=True)
    # Files beside the model (its drift reference, say) carry over; not its model or card.
    shutil.copytree(source_dir, staging,
                    ignore=shutil.ignore_patterns(spec.default_model_filename, CARD_FILE))
    try:
        target = staging / spec.default_model_filename
        methods.produce(request.method, source, target, calibration)
        batches = [b for b in request.batches if b <= max(spec.max_batch_size, 1)]
        before, before_out = _figures(request.version, source, rows, labels, request, batches)
        after, after_out = _figures(version, target, rows, labels, request, batches)
        report = Report(
            model=spec.name, method=request.method, source=before, candidate=after,
            comparison=measure.compare(before_out, after_out), evaluation=evaluation,
            calibration=calibration_source, threads=request.threads,
            path=str(model_dir / version), created=datetime.now(UTC).isoformat(timespec="seconds"),
        )
        (staging / CARD_FILE).write_text(json.dumps(card(report), indent=2) + "\n",
                                         encoding="utf-8")
        staging.rename(model_dir / version)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _calibration(request: Request) -> tuple[dict[str, Array] | None, str]:
    if request.calibration is not None:
        return data.inputs(request.calibration, request.spec), str(request.calibration)
    if request.method != "static-int8":
        return None, ""
    return data.from_profile(request.repository, request.spec, request.version)


def _evaluation(request: Request,
                calibration: dict[str, Array] | None) -> tuple[dict[str, Array], str]:
    if request.eval is not None:
        return data.inputs(request.eval, request.spec), str(request.eval)
    if request.labels is not None:
        raise ValueError("--labels needs --eval (the rows the labels belong to)")
    if calibration is not None:
        return calibration, "the calibration rows"
    return data.random_inputs(request.spec), "random uniform [0, 1) inputs (no --eval given)"


def _figures(version: str, path: Path, rows: dict[str, Array], labels: Array | None,
             request: Request, batches: Sequence[int]) -> tuple[Figures, dict[str, Array]]:
    sess = measure.session(path, request.threads)
    result = measure.outputs(sess, rows)
    speeds = [measure.speed(sess, rows, b) for b in batches]
    accuracy = None if labels is None else measure.accuracy(result, labels)
    return Figures(version, path.stat().st_size, speeds, accuracy), result


def card(report: Report) -> dict[str, Any]:
    """The new version's model card: what it was made from, how, and what was measured."""
    figures: dict[str, Any] = {
        "size_bytes": report.candidate.size_bytes,
        "source_size_bytes": report.source.size_bytes,
        "threads": report.threads,
        "evaluation": report.evaluation,
        "rows": report.comparison.rows,
        "max_abs_error": report.comparison.max_abs_error,
        "max_rel_error": report.comparison.max_rel_error,
    }
    for mine, theirs in zip(report.candidate.speeds, report.source.speeds, strict=True):
        figures[f"latency_ms_b{mine.batch}"] = round(mine.latency_ms, 4)
        figures[f"source_latency_ms_b{theirs.batch}"] = round(theirs.latency_ms, 4)
        figures[f"rows_per_s_b{mine.batch}"] = round(mine.rows_per_s, 1)
    if report.comparison.top1_agreement is not None:
        figures["top1_agreement"] = report.comparison.top1_agreement
    if report.candidate.accuracy is not None:
        figures["accuracy"] = report.candidate.accuracy
        figures["source_accuracy"] = report.source.accuracy
    return {
        "derived_from": {"model": report.model, "version": report.source.version},
        "optimization": {
            "method": report.method,
            "tool": "peregrine optimize",
            "date": report.created,
            "onnxruntime": ort.__version__,
            "calibration": report.calibration,
        },
        "figures": figures,
    }
