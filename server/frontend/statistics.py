"""ModelStatistics responses built from the per-version stats."""

from __future__ import annotations

from server._pb import grpc_service_pb2 as pb
from server.errors import ModelNotFound
from server.metrics.stats import Duration, VersionStats
from server.repository.manager import ModelRepository, ServedVersion


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


def model_statistics(
    repository: ModelRepository, name: str, version: str
) -> pb.ModelStatisticsResponse:
    """Statistics of every served version, of one model's, or of one version."""
    served: list[ServedVersion] = repository.served_versions()
    if name:
        record = repository.record(name)
        if version and version not in record.versions:
            raise ModelNotFound(f"unknown version '{version}' of model '{name}'")
        served = [
            s for s in served if s.spec.name == name and (not version or s.version == version)
        ]
    return pb.ModelStatisticsResponse(
        model_stats=[
            version_statistics(s.spec.name, s.version, s.metrics.stats)
            for s in sorted(served, key=lambda s: (s.spec.name, int(s.version)))
        ]
    )
