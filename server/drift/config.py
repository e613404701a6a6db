"""Per-model drift settings, read from the string ``parameters`` of config.pbtxt.

Drift monitoring is on for a model when ``drift_sample_rate`` is above 0. Every key is
optional; the defaults are below. Keys, as ``parameters { key: "..." value: { string_value:
"..." } }``:

``drift_sample_rate``       fraction of requests sampled, 0..1 (default 0: off)
``drift_sampling``          ``random`` (default) or ``request_id``: a deterministic hash of the
                            request id, so every replica samples the same requests (requests
                            without an id fall back to random)
``drift_feature_axis``      axis of every tensor that holds the features, counted with the batch
                            axis (default -1, the last). The other non-batch axes are averaged:
                            an image [N, 3, H, W] with axis 1 gives 3 per-channel means per row
``drift_feature_axis_<T>``  the same for tensor ``<T>`` only
``drift_tensors``           comma-separated inputs/outputs to monitor (default: all of them)
``drift_categorical``       comma-separated numeric tensors to treat as categories (BYTES and
                            BOOL always are; integer outputs are class labels and are too)
``drift_window``            rows per window (default 2000): the sliding window holds the last
                            this many rows, and a fixed (tumbling) window closes every this many.
                            Larger windows detect smaller shifts and cost less per row (the
                            reference side of the tests is paid once per window)
``drift_min_rows``          rows the sliding window needs before it is evaluated (default half a
                            window)
``drift_psi_warning``       PSI at which a feature warns (default 0.1)
``drift_psi_alert``         PSI at which a feature alerts (default 0.25)
``drift_ks_alert``          false-alarm level of one window for the whole model (default 0.01):
                            a KS (numeric) or chi-square (categorical) p-value below this divided
                            by the number of features (Bonferroni) is an alert
``drift_js_warning``        Jensen-Shannon distance (base 2) of an output that warns (default 0.1)
``drift_js_alert``          ... that alerts (default 0.2)
``drift_missing_alert``     rise of the NaN/missing rate over the reference's that alerts
                            (default 0.05)
``drift_range_alert``       share of values outside the reference's [min, max], or of categories
                            the reference never saw, that alerts (default 0.05; any unseen
                            category warns)
``drift_ring_size``         samples the hot-path ring holds between two analyser passes
                            (default 4096); a full ring drops samples and counts them
``drift_store_dir``         where fixed windows are written, as ``<dir>/<model>/<version>/``;
                            relative to the repository root (default ``.drift``, which the
                            repository ignores as it starts with a dot)
``drift_store_max_bytes``   size cap of one version's stored windows; the oldest are deleted
                            first (default 67108864 = 64 MiB; 0 stores nothing)
``drift_store_format``      ``parquet`` (needs pyarrow), ``npz`` or ``auto`` (default: parquet
                            when pyarrow imports, else npz)
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

PREFIX = "drift_"
DEFAULT_STORE_DIR = ".drift"


class Sampling(enum.Enum):
    RANDOM = "random"
    REQUEST_ID = "request_id"


@dataclass(frozen=True, slots=True)
class Thresholds:
    psi_warning: float = 0.1
    psi_alert: float = 0.25
    ks_alert: float = 0.01
    js_warning: float = 0.1
    js_alert: float = 0.2
    missing_alert: float = 0.05
    range_alert: float = 0.05


@dataclass(frozen=True, slots=True)
class DriftConfig:
    sample_rate: float = 0.0
    sampling: Sampling = Sampling.RANDOM
    feature_axis: int = -1
    feature_axes: Mapping[str, int] = field(default_factory=dict)
    tensors: tuple[str, ...] = ()
    categorical: frozenset[str] = frozenset()
    window: int = 2000
    min_rows: int = 1000
    thresholds: Thresholds = Thresholds()
    ring_size: int = 4096
    store_dir: str = DEFAULT_STORE_DIR
    store_max_bytes: int = 64 * 1024 * 1024
    store_format: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0.0

    def axis_of(self, tensor: str) -> int:
        return self.feature_axes.get(tensor, self.feature_axis)

    def store_path(self, repository: Path, model: str, version: str) -> Path:
        return repository / self.store_dir / model / version


_KNOWN = frozenset({
    "sample_rate", "sampling", "feature_axis", "tensors", "categorical", "window", "min_rows",
    "psi_warning", "psi_alert", "ks_alert", "js_warning", "js_alert", "missing_alert",
    "range_alert", "ring_size", "store_dir", "store_max_bytes", "store_format",
})


def _number(params: Mapping[str, str], key: str, default: float, low: float,
             high: float = float("inf")) -> float:
    text = params.get(PREFIX + key)
    if text is None or not text.strip():
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{key} must be a number, got '{text}'") from None
    if not low <= value <= high:
        raise ValueError(f"{PREFIX}{key} must be within {low}..{high}, got {value}")
    return value


def _integer(params: Mapping[str, str], key: str, default: int, low: int) -> int:
    text = params.get(PREFIX + key)
    if text is None or not text.strip():
        return default
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"{PREFIX}{key} must be an integer, got '{text}'") from None
    if value < low:
        raise ValueError(f"{PREFIX}{key} must be at least {low}, got {value}")
    return value


def _names(params: Mapping[str, str], key: str) -> tuple[str, ...]:
    text = params.get(PREFIX + key, "")
    return tuple(part.strip() for part in text.split(",") if part.strip())


def parse(params: Mapping[str, str]) -> DriftConfig:
    """The model's drift settings (``enabled`` False when sampling is off). Raises ValueError,
    naming the key, on a bad value or an unknown ``drift_`` key: a typo must not silently
    switch monitoring off."""
    axis_prefix = PREFIX + "feature_axis_"
    for key in params:
        if key.startswith(PREFIX) and not key.startswith(axis_prefix) \
                and key[len(PREFIX):] not in _KNOWN:
            raise ValueError(f"unknown drift parameter '{key}'")
    rate = _number(params, "sample_rate", 0.0, 0.0, 1.0)
    sampling_text = params.get(PREFIX + "sampling", "random").strip() or "random"
    try:
        sampling = Sampling(sampling_text)
    except ValueError:
        raise ValueError(
            f"{PREFIX}sampling must be random or request_id, got '{sampling_text}'"
        ) from None
    axes = {}
    for key in params:
        if key.startswith(axis_prefix):
            axes[key[len(axis_prefix):]] = _axis(params[key], key)
    window = _integer(params, "window", 2000, 2)
    store_format = params.get(PREFIX + "store_format", "auto").strip() or "auto"
    if store_format not in ("auto", "parquet", "npz"):
        raise ValueError(f"{PREFIX}store_format must be auto, parquet or npz, "
                         f"got '{store_format}'")
    thresholds = Thresholds(
        psi_warning=_number(params, "psi_warning", 0.1, 0.0),
        psi_alert=_number(params, "psi_alert", 0.25, 0.0),
        ks_alert=_number(params, "ks_alert", 0.01, 0.0, 1.0),
        js_warning=_number(params, "js_warning", 0.1, 0.0, 1.0),
        js_alert=_number(params, "js_alert", 0.2, 0.0, 1.0),
        missing_alert=_number(params, "missing_alert", 0.05, 0.0, 1.0),
        range_alert=_number(params, "range_alert", 0.05, 0.0, 1.0),
    )
    if thresholds.psi_alert < thresholds.psi_warning:
        raise ValueError(f"{PREFIX}psi_alert must not be below {PREFIX}psi_warning")
    if thresholds.js_alert < thresholds.js_warning:
        raise ValueError(f"{PREFIX}js_alert must not be below {PREFIX}js_warning")
    return DriftConfig(
        sample_rate=rate,
        sampling=sampling,
        feature_axis=_axis(params.get(PREFIX + "feature_axis", "-1"), PREFIX + "feature_axis"),
        feature_axes=axes,
        tensors=_names(params, "tensors"),
        categorical=frozenset(_names(params, "categorical")),
        window=window,
        min_rows=min(window, _integer(params, "min_rows", max(1, window // 2), 1)),
        thresholds=thresholds,
        ring_size=_integer(params, "ring_size", 4096, 1),
        store_dir=params.get(PREFIX + "store_dir", "").strip() or DEFAULT_STORE_DIR,
        store_max_bytes=_integer(params, "store_max_bytes", 64 * 1024 * 1024, 0),
        store_format=store_format,
    )


def _axis(text: str, key: str) -> int:
    try:
        axis = int(text)
    except ValueError:
        raise ValueError(f"{key} must be an integer axis, got '{text}'") from None
    if axis == 0:
        raise ValueError(f"{key} must not be 0: axis 0 is the batch axis")
    return axis
