"""Compare one window of live rows with the reference profile: per-feature results, levels and
the model's drift score.

Rules (thresholds from config, see server/drift/options.py):

* numeric feature: PSI over the reference's quantile bins, two-sample KS against the
  profile's subsample, NaN-rate rise, share outside the reference [min, max];
* categorical feature: PSI and chi-square over the reference categories plus an "other" and
  an "unseen" bucket, NaN-rate rise, share of unseen categories (its out-of-range rate);
* outputs (predictions) also get the Jensen-Shannon distance of their distribution.

A feature alerts when PSI >= psi_alert, or its p-value < ks_alert / (features tested) (a
Bonferroni split, so that ``ks_alert`` bounds the chance that a window without drift alerts
through a test), or JS >= js_alert, or the missing rise >= missing_alert, or the out-of-range
share >= range_alert; it warns at PSI >= psi_warning, JS >= js_warning or any unseen category.
The model's score is its largest feature PSI (a number operators know: < 0.1 stable,
0.1..0.25 moderate, > 0.25 large); its level is its worst feature's.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.drift import measures
from server.drift.features import Kind, Role
from server.drift.options import Thresholds
from server.drift.profile import CategoricalProfile, NumericProfile, ReferenceProfile
from server.drift.window import Block
from server.types import Array

OTHER = "<other>"
UNSEEN = "<unseen>"


class Level(enum.IntEnum):
    OK = 0
    WARNING = 1
    ALERT = 2

    @property
    def label(self) -> str:
        return self.name.lower()


@dataclass(frozen=True, slots=True)
class FeatureResult:
    tensor: str
    role: Role
    feature: str
    kind: Kind
    rows: int
    psi: float
    #: KS p-value (numeric) or chi-square p-value (categorical); NaN when not tested.
    pvalue: float
    #: KS D or chi-square statistic.
    statistic: float
    #: Jensen-Shannon distance (outputs only, else NaN).
    js: float
    missing_rate: float
    missing_reference: float
    out_of_range: float
    level: Level
    reasons: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "tensor": self.tensor, "role": self.role.value, "feature": self.feature,
            "kind": self.kind.value, "rows": self.rows, "psi": self.psi,
            "pvalue": self.pvalue, "statistic": self.statistic, "js": self.js,
            "missing_rate": self.missing_rate, "missing_reference": self.missing_reference,
            "out_of_range": self.out_of_range, "level": self.level.label,
            "reasons": list(self.reasons),
        }


@dataclass(frozen=True, slots=True)
class WindowReport:
    model: str
    version: str
    window: str  # "sliding" or "fixed"
    sequence: int
    rows: int
    features: tuple[FeatureResult, ...]
    score: float
    level: Level

    def worst(self, count: int | None = None) -> list[FeatureResult]:
        """Features worst first: by level, then PSI."""
        ranked = sorted(self.features, key=lambda f: (-f.level, -_nan_low(f.psi)))
        return ranked if count is None else ranked[:count]


def _nan_low(value: float) -> float:
    return -1.0 if math.isnan(value) else value


@dataclass(frozen=True, slots=True)
class _Raw:
    """A feature's measurements before levels are assigned (they need the number of tests)."""

    tensor: str
    role: Role
    profile: NumericProfile | CategoricalProfile
    rows: int
    psi: float
    pvalue: float
    statistic: float
    js: float
    missing: float
    out_of_range: float
    unseen: bool


def evaluate(
    profile: ReferenceProfile,
    block: Block,
    thresholds: Thresholds,
    window: str,
    sequence: int = 0,
) -> WindowReport:
    raws: list[_Raw] = []
    for tensor in profile.tensors:
        values = block.values.get(tensor.name)
        if values is None:
            continue
        present = block.present.get(tensor.name)
        if present is not None:
            values = values[present]
        if values.shape[0] == 0 or values.shape[1] != len(tensor.features):
            continue
        numeric = [f for f in tensor.features if isinstance(f, NumericProfile)]
        if len(numeric) == len(tensor.features):
            raws += _numeric_tensor(tensor.name, tensor.role, numeric,
                                    np.asarray(values, dtype=np.float64))
            continue
        for index, feature in enumerate(tensor.features):
            if isinstance(feature, CategoricalProfile):
                raws.append(_categorical(tensor.name, tensor.role, feature, values[:, index]))
    tests = sum(1 for r in raws if not math.isnan(r.pvalue))
    results = tuple(_judge(r, thresholds, tests) for r in raws)
    psis = [r.psi for r in results if not math.isnan(r.psi)]
    return WindowReport(
        model=profile.model,
        version=profile.version,
        window=window,
        sequence=sequence,
        rows=block.rows,
        features=results,
        score=max(psis) if psis else 0.0,
        level=max((r.level for r in results), default=Level.OK),
    )


def _numeric_tensor(tensor: str, role: Role, refs: list[NumericProfile],
                    values: Array) -> list[_Raw]:
    """All numeric features of a tensor, measured together where they can be: the columns
    without NaN whose references hold samples of one size (the usual case) form one matrix;
    a column with NaN is measured alone on its non-NaN values."""
    nan = np.isnan(values)
    missing = nan.mean(axis=0) if values.shape[0] else np.zeros(values.shape[1])
    results: dict[int, _Raw] = {}
    together: dict[int, list[int]] = {}
    for j, ref in enumerate(refs):
        if ref.count == 0:
            results[j] = _unmeasured(tensor, role, ref, float(missing[j]))
        elif nan[:, j].any():
            kept = values[~nan[:, j], j][:, np.newaxis]
            results[j] = _measure(tensor, role, [ref], kept, missing[j:j + 1])[0]
        else:
            together.setdefault(ref.sample.size, []).append(j)
    for columns in together.values():
        measured = _measure(tensor, role, [refs[j] for j in columns], values[:, columns],
                            missing[columns])
        results.update(zip(columns, measured, strict=True))
    return [results[j] for j in range(len(refs))]


def _unmeasured(tensor: str, role: Role, ref: NumericProfile | CategoricalProfile,
                missing: float) -> _Raw:
    return _Raw(tensor, role, ref, 0, math.nan, math.nan, math.nan, math.nan, missing, 0.0,
                False)


def _measure(tensor: str, role: Role, refs: list[NumericProfile], values: Array,
             missing: Array) -> list[_Raw]:
    """PSI, KS, JS and the out-of-range share of columns without NaN, vectorised."""
    rows = values.shape[0]
    if rows == 0:
        return [_unmeasured(tensor, role, r, float(m)) for r, m in zip(refs, missing,
                                                                       strict=True)]
    width = max(r.edges.size for r in refs)
    edges = np.full((len(refs), width), np.inf)
    expected = np.zeros((len(refs), width + 1))
    for j, ref in enumerate(refs):
        edges[j, :ref.edges.size] = ref.edges
        expected[j, :ref.proportions.size] = ref.proportions
    live = measures.histogram_columns(values, edges) / rows
    psi = measures.psi_rows(expected, live)
    js = measures.js_rows(expected, live) if role is Role.OUTPUT else np.full(len(refs), math.nan)
    d, p = measures.ks_rows(np.ascontiguousarray(values.T), np.stack([r.sample for r in refs]))
    low = np.asarray([r.min for r in refs])
    high = np.asarray([r.max for r in refs])
    outside = ((values < low) | (values > high)).mean(axis=0)
    return [
        _Raw(tensor, role, ref, rows, float(psi[j]), float(p[j]), float(d[j]), float(js[j]),
             float(missing[j]), float(outside[j]), False)
        for j, ref in enumerate(refs)
    ]


def category_buckets(ref: CategoricalProfile) -> list[str]:
    """The reference categories, then the "other" and "unseen" buckets."""
    return [*ref.categories, OTHER, UNSEEN]


def category_counts(ref: CategoricalProfile, values: Array) -> Array:
    """Live counts per bucket of :func:`category_buckets`."""
    index = {name: i for i, name in enumerate(ref.categories)}
    other = len(index)
    unseen = other + 1 if ref.other <= 0.0 else other  # only a complete list can tell unseen
    positions = [index.get(v, unseen) for v in values.tolist()]
    return np.bincount(np.asarray(positions, dtype=np.int64), minlength=other + 2)


def _categorical(tensor: str, role: Role, ref: CategoricalProfile, column: Array) -> _Raw:
    missing_mask = np.array([v is None for v in column.tolist()], dtype=bool)
    values = column[~missing_mask]
    missing = float(missing_mask.mean()) if column.size else 0.0
    if values.size == 0 or ref.count == 0:
        return _unmeasured(tensor, role, ref, missing)
    counts = category_counts(ref, values)
    expected = np.asarray([*ref.categories.values(), ref.other, 0.0])
    live = counts / values.size
    statistic, pvalue = measures.chi_square(counts, expected)
    unseen_share = float(live[-1])
    js = measures.js_distance(expected, live) if role is Role.OUTPUT else math.nan
    return _Raw(tensor, role, ref, int(values.size), measures.psi(expected, live), pvalue,
                statistic, js, missing, unseen_share, unseen_share > 0.0)


def _judge(raw: _Raw, limits: Thresholds, tests: int) -> FeatureResult:
    alerts: list[str] = []
    warnings: list[str] = []
    if not math.isnan(raw.psi):
        if raw.psi >= limits.psi_alert:
            alerts.append(f"psi {raw.psi:.3f}")
        elif raw.psi >= limits.psi_warning:
            warnings.append(f"psi {raw.psi:.3f}")
    if not math.isnan(raw.pvalue) and tests and raw.pvalue < limits.ks_alert / tests:
        test = "ks" if raw.profile.kind is Kind.NUMERIC else "chi2"
        alerts.append(f"{test} p {raw.pvalue:.2g}")
    if not math.isnan(raw.js):
        if raw.js >= limits.js_alert:
            alerts.append(f"js {raw.js:.3f}")
        elif raw.js >= limits.js_warning:
            warnings.append(f"js {raw.js:.3f}")
    rise = raw.missing - raw.profile.missing_rate
    if rise >= limits.missing_alert:
        alerts.append(f"missing +{rise:.1%}")
    what = "unseen" if raw.profile.kind is Kind.CATEGORICAL else "out of range"
    if raw.out_of_range >= limits.range_alert:
        alerts.append(f"{what} {raw.out_of_range:.1%}")
    elif raw.unseen:
        warnings.append(f"{what} {raw.out_of_range:.1%}")
    level = Level.ALERT if alerts else Level.WARNING if warnings else Level.OK
    return FeatureResult(
        tensor=raw.tensor, role=raw.role, feature=raw.profile.name, kind=raw.profile.kind,
        rows=raw.rows, psi=raw.psi, pvalue=raw.pvalue, statistic=raw.statistic, js=raw.js,
        missing_rate=raw.missing, missing_reference=raw.profile.missing_rate,
        out_of_range=raw.out_of_range, level=level, reasons=tuple(alerts + warnings),
    )
