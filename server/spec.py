"""Validated model specifications: what the hot path needs from a config.pbtxt, as frozen data.

The repository turns a parsed ModelConfig protobuf into a ModelSpec once, at load; the
scheduler, codec and backends read only these frozen objects.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from server.types import DataType


@dataclass(frozen=True, slots=True)
class TensorSpec:
    name: str
    datatype: DataType
    #: Dims without the batch dimension when the model batches; -1 is a variable dim.
    dims: tuple[int, ...]
    optional: bool = False


@dataclass(frozen=True, slots=True)
class QueuePolicy:
    timeout_us: int = 0
    allow_timeout_override: bool = False
    #: Requests allowed to wait at this priority; 0 means unbounded.
    max_queue_size: int = 0


@dataclass(frozen=True, slots=True)
class BatchingSpec:
    """dynamic_batching settings; ``enabled`` is False when the config has no such block."""

    enabled: bool = False
    max_queue_delay_us: int = 0
    preferred_batch_sizes: tuple[int, ...] = ()
    preserve_ordering: bool = False
    priority_levels: int = 0
    default_priority_level: int = 0
    default_queue_policy: QueuePolicy = QueuePolicy()
    priority_queue_policy: Mapping[int, QueuePolicy] = field(
        default_factory=lambda: MappingProxyType({})
    )

    def queue_policy(self, level: int) -> QueuePolicy:
        return self.priority_queue_policy.get(level, self.default_queue_policy)


@dataclass(frozen=True, slots=True)
class InstanceSpec:
    kind: str  # "CPU", "GPU" or "AUTO"
    count: int
    gpus: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class WarmupInput:
    datatype: DataType
    dims: tuple[int, ...]
    source: str  # "zero", "random" or "file"
    data_file: str = ""


@dataclass(frozen=True, slots=True)
class WarmupSpec:
    name: str
    batch_size: int
    count: int
    inputs: Mapping[str, WarmupInput]


@dataclass(frozen=True, slots=True)
class ModelSpec:
    name: str
    platform: str
    backend: str
    max_batch_size: int
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    batching: BatchingSpec = BatchingSpec()
    instances: tuple[InstanceSpec, ...] = (InstanceSpec(kind="CPU", count=1),)
    parameters: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    warmup: tuple[WarmupSpec, ...] = ()
    default_model_filename: str = "model.onnx"

    @property
    def batches(self) -> bool:
        """True when the first dimension of every tensor is the batch dimension."""
        return self.max_batch_size > 0

    def input(self, name: str) -> TensorSpec | None:
        for spec in self.inputs:
            if spec.name == name:
                return spec
        return None

    def output(self, name: str) -> TensorSpec | None:
        for spec in self.outputs:
            if spec.name == name:
                return spec
        return None

    @property
    def instance_count(self) -> int:
        return sum(group.count for group in self.instances)
