"""A config override sent with RepositoryModelLoad (``peregrine repo load --config``).

The override is a whole ModelConfig as JSON from a client, so beside parsing it its counts
and sizes are capped here: an instance count, a batch size or a dimension that the server
would turn into threads, sessions or warm-up buffers cannot exhaust it. The caps are far
above what a served model needs; config.pbtxt (the operator's own file) is not capped. Paths
in the override are checked like any config's (server/security/paths.py) when it loads.
"""

from __future__ import annotations

import math

from google.protobuf import json_format

from server._pb import model_config_pb2 as mc
from server.errors import InvalidInput

#: Triton's phrase for an override it cannot take (programs test for it).
INVALID = "Invalid config override: "
#: Instances of one version, over every instance group.
MAX_INSTANCES = 64
MAX_BATCH_SIZE = 1 << 16
#: Declared inputs, and declared outputs.
MAX_TENSORS = 256
#: Rank of a declared or warm-up tensor, and the largest value of one of its dims.
MAX_RANK = 16
MAX_DIM = 1 << 24
MAX_PREFERRED_BATCH_SIZES = 64
MAX_PRIORITY_LEVELS = 256
MAX_WARMUPS = 16
#: Runs of one warm-up entry, and the elements of one warm-up input (batch included).
MAX_WARMUP_COUNT = 1000
MAX_WARMUP_ELEMENTS = 1 << 26


def parse_override(text: str) -> mc.ModelConfig:
    """The override as a ModelConfig; InvalidInput says what is wrong or which cap it
    passes."""
    config = mc.ModelConfig()
    try:
        json_format.Parse(text, config)
    except json_format.ParseError as exc:
        raise InvalidInput(f"{INVALID}{exc} (not a valid ModelConfig)") from None
    _check_limits(config)
    return config


def _cap(value: int, limit: int, what: str) -> None:
    if value > limit:
        raise InvalidInput(f"{INVALID}{what} is {value}; the limit is {limit}")


def _check_dims(dims: list[int], where: str) -> None:
    _cap(len(dims), MAX_RANK, f"the rank of {where}")
    for dim in dims:
        _cap(dim, MAX_DIM, f"a dim of {where}")


def _check_limits(config: mc.ModelConfig) -> None:
    _cap(sum(max(group.count, 1) for group in config.instance_group), MAX_INSTANCES,
         "the instance count (over every instance_group)")
    _cap(config.max_batch_size, MAX_BATCH_SIZE, "max_batch_size")
    for kind, tensors in (("input", config.input), ("output", config.output)):
        _cap(len(tensors), MAX_TENSORS, f"the number of {kind}s")
        for tensor in tensors:
            _check_dims(list(tensor.dims), f"{kind} '{tensor.name}'")
    batching = config.dynamic_batching
    _cap(len(batching.preferred_batch_size), MAX_PREFERRED_BATCH_SIZES,
         "the number of preferred_batch_size values")
    _cap(batching.priority_levels, MAX_PRIORITY_LEVELS, "priority_levels")
    _cap(len(config.model_warmup), MAX_WARMUPS, "the number of model_warmup entries")
    for warm in config.model_warmup:
        where = f"model_warmup '{warm.name}'"
        _cap(warm.count, MAX_WARMUP_COUNT, f"the count of {where}")
        _cap(len(warm.inputs), MAX_TENSORS, f"the number of inputs of {where}")
        for name, data in warm.inputs.items():
            dims = list(data.dims)
            _check_dims(dims, f"{where} input '{name}'")
            elements = max(warm.batch_size, 1) * math.prod(max(d, 1) for d in dims)
            _cap(elements, MAX_WARMUP_ELEMENTS, f"the element count of {where} input '{name}'")
