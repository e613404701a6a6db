"""Every exported metric is defined in this package."""

from server.metrics.registry import MetricsRegistry, VersionMetrics
from server.metrics.statistics import VersionStats

__all__ = ["MetricsRegistry", "VersionMetrics", "VersionStats"]
