"""What the server tells about itself, through tritonclient (off the load path).

Every call here tolerates servers that lack the RPC (peers without ModelConfig or
ModelStatistics): the answer is then None and the report says "n/a".
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bench.loadgen.inputs import TensorMeta
from server.cli.connection import ClientSecurity


@dataclass(frozen=True, slots=True)
class StatsSnapshot:
    """Cumulative ModelStatistics counters of one model, summed over its versions."""

    inference_count: int
    execution_count: int
    success_count: int
    queue_ns: int
    compute_ns: int


def split_between(before: StatsSnapshot, after: StatsSnapshot) -> dict[str, float] | None:
    """Server-side time per request between two snapshots: queue, compute, mean batch."""
    requests = after.success_count - before.success_count
    if requests <= 0:
        return None
    executions = after.execution_count - before.execution_count
    inferences = after.inference_count - before.inference_count
    return {
        "queue_us": (after.queue_ns - before.queue_ns) / requests / 1e3,
        "compute_us": (after.compute_ns - before.compute_ns) / requests / 1e3,
        "mean_batch_rows": inferences / executions if executions > 0 else 0.0,
        "requests": float(requests),
    }


class ServerInfo:
    def __init__(self, url: str, timeout_s: float = 10.0,
                 security: ClientSecurity | None = None) -> None:
        security = security or ClientSecurity()
        self.url = url
        self._timeout = timeout_s
        self._client = triton.InferenceServerClient(
            url, creds=security.credentials(), channel_args=security.options() or None)
        #: The token, on every call.
        self._headers = dict(security.metadata) or None

    def close(self) -> None:
        self._client.close()

    def wait_ready(self, model: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                if self._client.is_model_ready(model, headers=self._headers,
                                               client_timeout=2.0):
                    return
            except InferenceServerException as exc:
                last = exc
            time.sleep(0.2)
        raise TimeoutError(f"model '{model}' not ready at {self.url} after {timeout_s:.0f} s"
                           + (f": {last}" if last else ""))

    def server_metadata(self) -> dict[str, Any] | None:
        try:
            answer = self._client.get_server_metadata(as_json=True, headers=self._headers,
                                                      client_timeout=self._timeout)
        except InferenceServerException:
            return None
        return {"name": answer.get("name", ""), "version": answer.get("version", "")}

    def inputs(self, model: str, version: str = "") -> list[TensorMeta] | None:
        """The model's inputs from ModelMetadata; None when the server gives none."""
        try:
            answer = self._client.get_model_metadata(model, version, as_json=True,
                                                     headers=self._headers,
                                                     client_timeout=self._timeout)
        except InferenceServerException:
            return None
        metas = [TensorMeta(t["name"], t["datatype"], tuple(int(d) for d in t.get("shape", [])))
                 for t in answer.get("inputs", [])]
        return metas or None

    def batches(self, model: str, version: str = "") -> bool | None:
        """Whether the model has a batch dimension (ModelConfig max_batch_size > 0)."""
        try:
            answer = self._client.get_model_config(model, version, as_json=True,
                                                   headers=self._headers,
                                                   client_timeout=self._timeout)
        except InferenceServerException:
            return None
        return int(answer.get("config", {}).get("max_batch_size", 0)) > 0

    def statistics(self, model: str, version: str = "") -> StatsSnapshot | None:
        try:
            answer = self._client.get_inference_statistics(model, version, as_json=True,
                                                           headers=self._headers,
                                                           client_timeout=self._timeout)
        except InferenceServerException:
            return None
        stats = answer.get("model_stats", [])
        if not stats:
            return None

        def ns(entry: dict[str, Any], key: str) -> int:
            return int(entry.get("inference_stats", {}).get(key, {}).get("ns", 0))

        return StatsSnapshot(
            inference_count=sum(int(s.get("inference_count", 0)) for s in stats),
            execution_count=sum(int(s.get("execution_count", 0)) for s in stats),
            success_count=sum(int(s.get("inference_stats", {}).get("success", {})
                                  .get("count", 0)) for s in stats),
            queue_ns=sum(ns(s, "queue") for s in stats),
            compute_ns=sum(ns(s, "compute_input") + ns(s, "compute_infer")
                           + ns(s, "compute_output") for s in stats),
        )
