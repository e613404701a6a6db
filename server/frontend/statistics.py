"""ModelStatistics responses built from the per-version stats."""

from __future__ import annotations

from server._pb import grpc_service_pb2 as pb
from server.control import VersionStatistics
from server.metrics.statistics import Duration, VersionStats


def _duration(value: Duration) -> pb.StatisticDuration:
    return pb.StatisticDuration(count=value.count, ns=value.ns)


def version_statistics(name: str, version: str, stats: VersionStats) -> pb.ModelStatistics:
    return pb.ModelStatistics(
        name=name,
        version=version,
        last_inference=stats.last_inference_ms,
        inference_count=stats.inference_count,
        execution_count=stats.execution_count,
        inference_stats=pb.InferStatistics(
            success=_duration(stats.success),
            fail=_duration(stats.fail),
            queue=_duration(stats.queue),
            compute_input=_duration(stats.compute_input),
            compute_infer=_duration(stats.compute_infer),
            compute_output=_duration(stats.compute_output),
            cache_hit=_duration(stats.cache_hit),
            cache_miss=_duration(stats.cache_miss),
        ),
        batch_stats=[
            pb.InferBatchStatistics(
                batch_size=size,
                compute_input=_duration(batch.compute_input),
                compute_infer=_duration(batch.compute_infer),
                compute_output=_duration(batch.compute_output),
            )
            for size, batch in sorted(stats.batches.items())
        ],
    )


def statistics_response(versions: list[VersionStatistics]) -> pb.ModelStatisticsResponse:
    return pb.ModelStatisticsResponse(
        model_stats=[version_statistics(v.name, v.version, v.stats) for v in versions]
    )
