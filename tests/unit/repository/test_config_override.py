"""A config override from a client (server/repository/override.py): parsed, and its counts
capped with a message naming what passed which limit."""

from __future__ import annotations

import json

import pytest

from server.errors import InvalidInput
from server.repository import override
from server.repository.override import parse_override


def test_an_override_within_the_caps_parses() -> None:
    config = parse_override(json.dumps({
        "name": "m", "max_batch_size": override.MAX_BATCH_SIZE,
        "instance_group": [{"count": 32}, {"count": 32}],
        "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": [-1, override.MAX_DIM]}],
        "dynamic_batching": {"preferred_batch_size": [1, 2, 4]},
        "model_warmup": [{"name": "w", "batch_size": 4, "count": 3, "inputs": {
            "x": {"data_type": "TYPE_FP32", "dims": [1024], "zero_data": True}}}],
    }))
    assert config.name == "m" and sum(g.count for g in config.instance_group) == 64


def test_an_override_that_is_not_a_model_config_is_invalid_input() -> None:
    with pytest.raises(InvalidInput, match="not a valid ModelConfig"):
        parse_override('{"name": "m", "no_such_field": 1}')


@pytest.mark.parametrize(("fields", "message"), [
    ({"instance_group": [{"count": 60}, {}, {"count": 4}]},
     "the instance count (over every instance_group) is 65; the limit is 64"),
    ({"max_batch_size": override.MAX_BATCH_SIZE + 1}, "max_batch_size is 65537"),
    ({"output": [{"name": "y", "dims": [1] * 17}]}, "the rank of output 'y' is 17"),
    ({"input": [{"name": "x", "dims": [override.MAX_DIM + 1]}]}, "a dim of input 'x'"),
    ({"dynamic_batching": {"priority_levels": 1000}}, "priority_levels is 1000"),
    ({"model_warmup": [{"name": str(i)} for i in range(17)]},
     "the number of model_warmup entries is 17"),
    ({"model_warmup": [{"name": "w", "batch_size": 1024, "inputs": {
        "x": {"dims": [1 << 20], "zero_data": True}}}]},
     "the element count of model_warmup 'w' input 'x'"),
])
def test_counts_beyond_the_caps_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidInput) as err:
        parse_override(json.dumps({"name": "m", **fields}))
    assert message in err.value.message and "the limit is" in err.value.message
