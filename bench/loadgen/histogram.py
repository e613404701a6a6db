"""Latency histograms: HdrHistogram (the ``hdrhistogram`` package) behind a small facade.

Values are nanoseconds, tracked from 1 ns to 100 s with 3 significant digits, so every
reported value is within 0.1% of a recorded one. Histograms travel between processes and
into the run JSON as HdrHistogram's compressed base64 encoding, and merge by adding
counts, never by averaging percentiles.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

LOWEST_NS = 1
HIGHEST_NS = 100 * 1_000_000_000
SIGNIFICANT_DIGITS = 3

#: The percentiles every report carries, and the keys they get in the run JSON.
PERCENTILES: tuple[tuple[str, float], ...] = (
    ("p50", 50.0),
    ("p90", 90.0),
    ("p99", 99.0),
    ("p99.9", 99.9),
)


class LatencyHistogram:
    """Counts of latencies in nanoseconds; values past 100 s are clamped to 100 s."""

    __slots__ = ("_hdr",)

    def __init__(self) -> None:
        self._hdr = HdrHistogram(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)

    def record(self, value_ns: int) -> None:
        self._hdr.record_value(min(max(value_ns, LOWEST_NS), HIGHEST_NS))

    def record_many(self, values_ns: Iterable[int]) -> None:
        record = self._hdr.record_value
        for value in values_ns:
            record(min(max(value, LOWEST_NS), HIGHEST_NS))

    def merge(self, other: LatencyHistogram) -> None:
        self._hdr.add(other._hdr)

    @property
    def count(self) -> int:
        return int(self._hdr.get_total_count())

    def percentile_ns(self, percentile: float) -> int:
        """The smallest recorded value (bucket upper bound) with ``percentile``% at or below."""
        return int(self._hdr.get_value_at_percentile(percentile)) if self.count else 0

    def max_ns(self) -> int:
        return int(self._hdr.get_max_value()) if self.count else 0

    def min_ns(self) -> int:
        return int(self._hdr.get_min_value()) if self.count else 0

    def mean_ns(self) -> float:
        return float(self._hdr.get_mean_value()) if self.count else 0.0

    def summary_ms(self) -> dict[str, float]:
        """p50/p90/p99/p99.9, max, min and mean in milliseconds (zeros when empty)."""
        values = {key: self.percentile_ns(p) / 1e6 for key, p in PERCENTILES}
        values["max"] = self.max_ns() / 1e6
        values["min"] = self.min_ns() / 1e6
        values["mean"] = self.mean_ns() / 1e6
        return values

    def cdf_ms(self, points: int = 200) -> list[tuple[float, float]]:
        """(latency ms, fraction at or below) pairs, thinned to at most about ``points``."""
        if not self.count:
            return []
        pairs = [
            (item.value_iterated_to / 1e6, item.percentile / 100.0)
            for item in self._hdr.get_recorded_iterator()
        ]
        step = max(1, len(pairs) // points)
        thinned = pairs[::step]
        if thinned[-1] != pairs[-1]:
            thinned.append(pairs[-1])
        return thinned

    def encode(self) -> str:
        """HdrHistogram's compressed base64 form (a few hundred bytes)."""
        if not self.count:
            return ""
        encoded = self._hdr.encode()
        return encoded.decode("ascii") if isinstance(encoded, bytes) else str(encoded)

    @classmethod
    def decode(cls, encoded: str) -> LatencyHistogram:
        histogram = cls()
        if encoded:
            histogram._hdr.decode_and_add(encoded)
        return histogram

    @classmethod
    def merged(cls, parts: Sequence[LatencyHistogram]) -> LatencyHistogram:
        total = cls()
        for part in parts:
            total.merge(part)
        return total
