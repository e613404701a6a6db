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
``drift_ring_max_bytes``    bytes those samples may hold together (the copied tensors,
                            default 33554432 = 32 MiB); past it the ring drops and counts too
``drift_store_dir``         where fixed windows are written, as ``<dir>/<model>/<version>/``;
                            relative to the repository root and inside it (no absolute path,
                            no '..'; default ``.drift``, which the repository ignores as it
                            starts with a dot)
``drift_store_max_bytes``   size cap of one version's stored windows; the oldest are deleted
                            first (default 67108864 = 64 MiB; 0 stores nothing)
``drift_store_format``      ``parquet`` (needs pyarrow), ``npz`` or ``auto`` (default: parquet
                            when pyarrow imports, else npz)
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from server.errors import ModelLoadError
from server.parameters import Key, choice, integer, names, number, optional
from server.security.paths import confined, relative_path

PREFIX = "drift_"
DEFAULT_STORE_DIR = ".drift"
T = TypeVar("T")


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
    ring_max_bytes: int = 32 * 1024 * 1024
    store_dir: str = DEFAULT_STORE_DIR
    store_max_bytes: int = 64 * 1024 * 1024
    store_format: str = "auto"

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0.0

    def axis_of(self, tensor: str) -> int:
        return self.feature_axes.get(tensor, self.feature_axis)

    def store_path(self, repository: Path, model: str, version: str) -> Path:
        """``<repository>/<store_dir>/<model>/<version>``; ModelLoadError when ``store_dir``
        leads out of the repository."""
        store = confined(repository, self.store_dir, "drift_store_dir", "the repository")
        return store / model / version


_DEFAULT = DriftConfig()
_LIMITS = _DEFAULT.thresholds


def _axis(value: str) -> int:
    expected = "an integer axis other than 0 (the batch axis)"
    try:
        axis = int(value)
    except ValueError:
        raise ValueError(expected) from None
    if axis == 0:
        raise ValueError(expected)
    return axis


def _key(name: str, parse: Callable[[str], T], meaning: str, default: object = "",
         member: str = "") -> Key[T]:
    return Key(PREFIX + name, parse, meaning, str(default), member)


SAMPLE_RATE = _key("sample_rate", number(0.0, 1.0), "fraction of requests sampled; 0: off",
                   _DEFAULT.sample_rate)
SAMPLING = _key("sampling", choice(*(s.value for s in Sampling), case_sensitive=True),
                "random, or request_id (a hash of the request id)", _DEFAULT.sampling.value)
FEATURE_AXIS = _key("feature_axis", _axis, "the axis of every tensor that holds the features",
                    _DEFAULT.feature_axis)
FEATURE_AXIS_OF = _key("feature_axis_", _axis, "the feature axis of one tensor",
                       _DEFAULT.feature_axis, member="<tensor>")
TENSORS = _key("tensors", names, "comma-separated tensors to monitor (default: all)")
CATEGORICAL = _key("categorical", names, "comma-separated numeric tensors that are categories")
WINDOW = _key("window", integer(2), "rows per window", _DEFAULT.window)
MIN_ROWS = _key("min_rows", optional(integer(1)),
                "rows the sliding window needs before it is evaluated (default: half a window)")
PSI_WARNING = _key("psi_warning", number(0.0), "PSI at which a feature warns",
                   _LIMITS.psi_warning)
PSI_ALERT = _key("psi_alert", number(0.0), "PSI at which a feature alerts", _LIMITS.psi_alert)
KS_ALERT = _key("ks_alert", number(0.0, 1.0), "false-alarm level of one window for the model",
                _LIMITS.ks_alert)
JS_WARNING = _key("js_warning", number(0.0, 1.0), "JS distance of an output that warns",
                  _LIMITS.js_warning)
JS_ALERT = _key("js_alert", number(0.0, 1.0), "JS distance of an output that alerts",
                _LIMITS.js_alert)
MISSING_ALERT = _key("missing_alert", number(0.0, 1.0), "rise of the missing rate that alerts",
                     _LIMITS.missing_alert)
RANGE_ALERT = _key("range_alert", number(0.0, 1.0), "share of out-of-range values that alerts",
                   _LIMITS.range_alert)
RING_SIZE = _key("ring_size", integer(1), "samples the ring holds between analyser passes",
                 _DEFAULT.ring_size)
RING_MAX_BYTES = _key("ring_max_bytes", integer(1),
                      "bytes the ring's samples may hold together", _DEFAULT.ring_max_bytes)
STORE_DIR = _key("store_dir", relative_path,
                 "where fixed windows are written (relative to the repository, inside it)",
                 _DEFAULT.store_dir)
STORE_MAX_BYTES = _key("store_max_bytes", integer(0), "size cap of one version's windows",
                       _DEFAULT.store_max_bytes)
STORE_FORMAT = _key("store_format", choice("auto", "parquet", "npz", case_sensitive=True),
                    "parquet, npz, or auto (parquet when pyarrow imports)",
                    _DEFAULT.store_format)
#: config.pbtxt ``parameters`` keys drift monitoring owns.
PARAMETER_KEYS = (SAMPLE_RATE, SAMPLING, FEATURE_AXIS, FEATURE_AXIS_OF, TENSORS, CATEGORICAL,
                  WINDOW, MIN_ROWS, PSI_WARNING, PSI_ALERT, KS_ALERT, JS_WARNING, JS_ALERT,
                  MISSING_ALERT, RANGE_ALERT, RING_SIZE, RING_MAX_BYTES, STORE_DIR,
                  STORE_MAX_BYTES, STORE_FORMAT)


def parse(params: Mapping[str, str], model: str) -> DriftConfig:
    """The model's drift settings (``enabled`` False when sampling is off). Raises
    ModelLoadError, naming the key, on a bad value: the repository checks this when the model
    loads, so a typo never silently switches monitoring off."""
    thresholds = Thresholds(
        psi_warning=PSI_WARNING.value(params, model),
        psi_alert=PSI_ALERT.value(params, model),
        ks_alert=KS_ALERT.value(params, model),
        js_warning=JS_WARNING.value(params, model),
        js_alert=JS_ALERT.value(params, model),
        missing_alert=MISSING_ALERT.value(params, model),
        range_alert=RANGE_ALERT.value(params, model),
    )
    for low, high in ((PSI_WARNING, PSI_ALERT), (JS_WARNING, JS_ALERT)):
        if high.value(params, model) < low.value(params, model):
            raise ModelLoadError(f"model '{model}' parameter '{high.name}' must not be below "
                                 f"'{low.name}'")
    window = WINDOW.value(params, model)
    min_rows = MIN_ROWS.value(params, model)
    return DriftConfig(
        sample_rate=SAMPLE_RATE.value(params, model),
        sampling=Sampling(SAMPLING.value(params, model)),
        feature_axis=FEATURE_AXIS.value(params, model),
        feature_axes=FEATURE_AXIS_OF.values(params, model),
        tensors=TENSORS.value(params, model),
        categorical=frozenset(CATEGORICAL.value(params, model)),
        window=window,
        min_rows=min(window, max(1, window // 2) if min_rows is None else min_rows),
        thresholds=thresholds,
        ring_size=RING_SIZE.value(params, model),
        ring_max_bytes=RING_MAX_BYTES.value(params, model),
        store_dir=STORE_DIR.value(params, model),
        store_max_bytes=STORE_MAX_BYTES.value(params, model),
        store_format=STORE_FORMAT.value(params, model),
    )
