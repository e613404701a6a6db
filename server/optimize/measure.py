"""Figures of one model file, measured in process with ONNX Runtime: size, latency and
throughput per batch size, its outputs over a data set, and how they compare with another
file's (accuracy on labels, top-1 agreement, largest absolute and relative errors)."""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from server.types import Array

#: Below this magnitude a relative error is taken against the floor, not the value, so that
#: two near-zero scores do not make a huge ratio out of a negligible difference.
REL_FLOOR = 1e-6


@dataclass(frozen=True, slots=True)
class Speed:
    batch: int
    #: Median wall time of one run of ``batch`` rows.
    latency_ms: float
    #: Rows per second over the timed runs.
    rows_per_s: float


@dataclass(frozen=True, slots=True)
class Comparison:
    """A candidate's outputs against the source's, over the same rows."""

    rows: int
    #: Share of rows whose predicted class is the same (None: no classifier output).
    top1_agreement: float | None
    max_abs_error: float
    max_rel_error: float


def session(path: Path, threads: int) -> ort.InferenceSession:
    """A CPU session with ``threads`` intra-op threads (the same for every file compared)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def rows_of(data: Mapping[str, Array], start: int, count: int) -> dict[str, Array]:
    """``count`` rows from ``start``, wrapping around a data set smaller than that."""
    total = len(next(iter(data.values())))
    index = (np.arange(start, start + count) % total)
    return {name: np.ascontiguousarray(value[index]) for name, value in data.items()}


def speed(sess: ort.InferenceSession, data: Mapping[str, Array], batch: int,
          min_seconds: float = 0.3, min_runs: int = 20) -> Speed:
    """Time runs of ``batch`` rows for at least ``min_seconds`` and ``min_runs``."""
    feed = rows_of(data, 0, batch)
    for _ in range(3):
        sess.run(None, feed)
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < min_runs or time.perf_counter() - began < min_seconds:
        start = time.perf_counter()
        sess.run(None, feed)
        times.append(time.perf_counter() - start)
    return Speed(batch, statistics.median(times) * 1e3, batch * len(times) / sum(times))


def outputs(sess: ort.InferenceSession, data: Mapping[str, Array],
            batch: int = 64) -> dict[str, Array]:
    """Every output over every row of ``data``, run ``batch`` rows at a time."""
    names = [o.name for o in sess.get_outputs()]
    total = len(next(iter(data.values())))
    parts: dict[str, list[Array]] = {name: [] for name in names}
    for start in range(0, total, batch):
        feed = {name: value[start:start + batch] for name, value in data.items()}
        for name, value in zip(names, sess.run(None, feed), strict=True):
            parts[name].append(np.asarray(value))
    return {name: np.concatenate(values) for name, values in parts.items()}


def predictions(result: Mapping[str, Array]) -> Array | None:
    """The predicted class per row: an integer output holding one value per row, else the
    arg-max of a float output with several scores per row; None when there is neither."""
    for value in result.values():
        if value.dtype.kind in "iu" and value.ndim >= 1 and value.size == len(value):
            return value.reshape(len(value))
    for value in result.values():
        if value.dtype.kind == "f" and value.ndim == 2 and value.shape[1] > 1:
            return np.asarray(np.argmax(value, axis=1))
    return None


def accuracy(result: Mapping[str, Array], labels: Array) -> float:
    """Share of rows whose predicted class is the label."""
    predicted = predictions(result)
    if predicted is None:
        raise ValueError("labels were given but the model has no classifier output (an "
                         "integer output per row, or a float output of several scores)")
    if len(predicted) != len(labels):
        raise ValueError(f"{len(labels)} labels for {len(predicted)} rows")
    return float(np.mean(predicted == labels.reshape(len(labels))))


def compare(source: Mapping[str, Array], candidate: Mapping[str, Array]) -> Comparison:
    mine, theirs = predictions(source), predictions(candidate)
    agreement = None if mine is None or theirs is None else float(np.mean(mine == theirs))
    max_abs = max_rel = 0.0
    for name, value in source.items():
        if value.dtype.kind != "f" or name not in candidate:
            continue
        a, b = value.astype(np.float64), candidate[name].astype(np.float64)
        diff = np.abs(a - b)
        scale = np.maximum(np.maximum(np.abs(a), np.abs(b)), REL_FLOOR)
        max_abs = max(max_abs, float(diff.max(initial=0.0)))
        max_rel = max(max_rel, float((diff / scale).max(initial=0.0)))
    rows = len(next(iter(source.values())))
    return Comparison(rows, agreement, max_abs, max_rel)
