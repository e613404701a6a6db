"""Reference profiles: per-feature statistics of the data a model version was built for.

Stored as JSON in ``<repository>/<model>/<version>/reference/profile.json``, beside the model
file (the repository loader only looks for the model file, so the extra directory is inert).
Numeric features keep quantile bin edges and the reference share per bin (for PSI and
Jensen-Shannon), mean, std, NaN rate, min/max (for the out-of-range rate) and a sorted uniform
subsample of the values (for the two-sample KS test). Categorical features keep their
categories' shares (up to a cap; the rest is "other").
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from server.atomic_file import write_atomically
from server.drift.features import Kind, Role, TensorLayout
from server.types import Array

FORMAT = 1
PROFILE_DIR = "reference"
PROFILE_FILE = "profile.json"


def profile_path(repository: Path, model: str, version: str) -> Path:
    return repository / model / version / PROFILE_DIR / PROFILE_FILE


@dataclass(frozen=True, slots=True, eq=False)
class NumericProfile:
    name: str
    count: int
    missing_rate: float
    mean: float
    std: float
    min: float
    max: float
    #: Inner bin edges, ascending and distinct; bin i holds (edges[i-1], edges[i]].
    edges: Array
    #: Reference share of each of the len(edges) + 1 bins.
    proportions: Array
    #: A sorted uniform subsample of the values, for the KS test.
    sample: Array

    kind: ClassVar[Kind] = Kind.NUMERIC


@dataclass(frozen=True, slots=True)
class CategoricalProfile:
    name: str
    count: int
    missing_rate: float
    #: Category -> share of the reference values, most frequent first.
    categories: Mapping[str, float]
    #: Share of reference values in categories past the cap; 0 when ``categories`` is complete,
    #: and only then can a live value be called unseen.
    other: float

    kind: ClassVar[Kind] = Kind.CATEGORICAL


FeatureProfile = NumericProfile | CategoricalProfile


@dataclass(frozen=True, slots=True)
class TensorProfile:
    name: str
    role: Role
    kind: Kind
    features: tuple[FeatureProfile, ...]

    @property
    def feature_names(self) -> list[str]:
        return [f.name for f in self.features]


@dataclass(frozen=True, slots=True)
class ReferenceProfile:
    model: str
    version: str
    rows: int
    created: str
    source: str
    tensors: tuple[TensorProfile, ...]

    def tensor(self, name: str) -> TensorProfile | None:
        for tensor in self.tensors:
            if tensor.name == name:
                return tensor
        return None

    @property
    def feature_count(self) -> int:
        return sum(len(t.features) for t in self.tensors)


# -- building ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProfileOptions:
    bins: int = 10
    max_categories: int = 1000
    sample_size: int = 2000
    seed: int = 0


def build(
    model: str,
    version: str,
    layouts: Sequence[TensorLayout],
    data: Mapping[str, Array],
    source: str = "",
    options: ProfileOptions = ProfileOptions(),
) -> ReferenceProfile:
    """Profile batch-first arrays (rows of the reference data) of every layout's tensor."""
    rng = np.random.default_rng(options.seed)
    tensors = []
    rows = 0
    for layout in layouts:
        if layout.name not in data:
            raise ValueError(f"the reference data has no tensor '{layout.name}'")
        matrix = layout.matrix(data[layout.name])
        rows = max(rows, matrix.shape[0])
        names = layout.feature_names(matrix.shape[1])
        features: list[FeatureProfile] = []
        for index, name in enumerate(names):
            column = matrix[:, index]
            if layout.kind is Kind.NUMERIC:
                features.append(_numeric(name, column, options, rng))
            else:
                features.append(_categorical(name, column, options))
        tensors.append(TensorProfile(layout.name, layout.role, layout.kind, tuple(features)))
    return ReferenceProfile(
        model=model, version=version, rows=rows,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        source=source, tensors=tuple(tensors),
    )


def _numeric(name: str, column: Array, options: ProfileOptions,
             rng: np.random.Generator) -> NumericProfile:
    present = column[~np.isnan(column)]
    total = column.shape[0]
    missing = 1.0 - present.size / total if total else 0.0
    finite = present[np.isfinite(present)]
    if finite.size == 0:
        return NumericProfile(name, 0, missing, math.nan, math.nan, math.nan, math.nan,
                              np.empty(0), np.ones(1), np.empty(0))
    quantiles = np.quantile(finite, np.linspace(0.0, 1.0, options.bins + 1)[1:-1])
    edges = np.unique(quantiles)
    counts = np.bincount(np.searchsorted(edges, present, side="left"),
                         minlength=edges.size + 1)
    size = min(options.sample_size, present.size)
    sample = np.sort(rng.choice(present, size=size, replace=False))
    return NumericProfile(
        name=name,
        count=int(present.size),
        missing_rate=float(missing),
        mean=float(finite.mean()),
        std=float(finite.std()),
        min=float(present.min()),
        max=float(present.max()),
        edges=edges.astype(np.float64),
        proportions=counts / present.size,
        sample=sample.astype(np.float64),
    )


def _categorical(name: str, column: Array, options: ProfileOptions) -> CategoricalProfile:
    values = [v for v in column.tolist() if v is not None]
    total = column.shape[0]
    missing = 1.0 - len(values) / total if total else 0.0
    counts = Counter(values)
    kept = counts.most_common(options.max_categories)
    count = len(values)
    shares = {str(k): c / count for k, c in kept} if count else {}
    other = 1.0 - sum(c for _, c in kept) / count if count else 0.0
    return CategoricalProfile(name, count, float(missing), shares, max(0.0, float(other)))


# -- storing -----------------------------------------------------------------------------------


def to_json(profile: ReferenceProfile) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "model": profile.model,
        "version": profile.version,
        "rows": profile.rows,
        "created": profile.created,
        "source": profile.source,
        "tensors": [
            {
                "name": t.name,
                "role": t.role.value,
                "kind": t.kind.value,
                "features": [_feature_json(f) for f in t.features],
            }
            for t in profile.tensors
        ],
    }


def _feature_json(feature: FeatureProfile) -> dict[str, Any]:
    if isinstance(feature, NumericProfile):
        return {
            "name": feature.name, "count": feature.count, "missing_rate": feature.missing_rate,
            "mean": feature.mean, "std": feature.std, "min": feature.min, "max": feature.max,
            "edges": feature.edges.tolist(), "proportions": feature.proportions.tolist(),
            "sample": feature.sample.tolist(),
        }
    return {
        "name": feature.name, "count": feature.count, "missing_rate": feature.missing_rate,
        "categories": dict(feature.categories), "other": feature.other,
    }


def from_json(document: Mapping[str, Any]) -> ReferenceProfile:
    if document.get("format") != FORMAT:
        raise ValueError(f"unsupported profile format {document.get('format')!r}")
    tensors = []
    for t in document["tensors"]:
        kind = Kind(t["kind"])
        features: list[FeatureProfile] = []
        for f in t["features"]:
            if kind is Kind.NUMERIC:
                features.append(NumericProfile(
                    name=f["name"], count=int(f["count"]), missing_rate=float(f["missing_rate"]),
                    mean=float(f["mean"]), std=float(f["std"]), min=float(f["min"]),
                    max=float(f["max"]), edges=_floats(f["edges"]),
                    proportions=_floats(f["proportions"]), sample=_floats(f["sample"]),
                ))
            else:
                features.append(CategoricalProfile(
                    name=f["name"], count=int(f["count"]), missing_rate=float(f["missing_rate"]),
                    categories={str(k): float(v) for k, v in f["categories"].items()},
                    other=float(f["other"]),
                ))
        tensors.append(TensorProfile(t["name"], Role(t["role"]), kind, tuple(features)))
    return ReferenceProfile(
        model=str(document["model"]), version=str(document["version"]),
        rows=int(document["rows"]), created=str(document["created"]),
        source=str(document.get("source", "")), tensors=tuple(tensors),
    )


def _floats(values: Sequence[float]) -> Array:
    return np.asarray(values, dtype=np.float64)


def save(profile: ReferenceProfile, path: Path) -> None:
    """Atomically, so a reader never sees half a file."""
    write_atomically(path, json.dumps(to_json(profile)), durable=False)


def load(path: Path) -> ReferenceProfile:
    with path.open(encoding="utf-8") as src:
        return from_json(json.load(src))
