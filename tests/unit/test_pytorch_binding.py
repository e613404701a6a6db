"""How the PyTorch backend matches config tensors to forward's arguments and result
(server/backends/pytorch/binding.py), without torch: Triton's <name>__<index> names, names of
forward arguments, dict and sequence results, and the load errors that name what matches
nothing."""

from __future__ import annotations

import pytest

from server.backends.pytorch.binding import bind
from server.backends.pytorch.program import ArgSpec
from server.errors import BackendError, ModelLoadError
from server.spec import ModelSpec, TensorSpec
from server.types import DataType


def spec(inputs: list[str], outputs: list[str], optional: bool = False) -> ModelSpec:
    return ModelSpec(
        name="m", platform="pytorch_libtorch", backend="pytorch", max_batch_size=4,
        inputs=tuple(TensorSpec(n, DataType.FP32, (2,), optional=optional) for n in inputs),
        outputs=tuple(TensorSpec(n, DataType.FP32, (2,)) for n in outputs),
    )


ARGS = (ArgSpec("features"), ArgSpec("mask"), ArgSpec("scale", has_default=True))


def test_indexed_names_take_positions_in_any_config_order() -> None:
    binding = bind(spec(["INPUT__1", "INPUT__0"], ["OUTPUT__1", "OUTPUT__0"]), ARGS)
    assert binding.inputs == ("INPUT__0", "INPUT__1")  # the default of scale is used
    assert binding.arguments({"INPUT__0": "a", "INPUT__1": "b"}) == ["a", "b"]
    assert binding.results(("first", "second")) == {"OUTPUT__1": "second",
                                                    "OUTPUT__0": "first"}


def test_named_inputs_and_outputs() -> None:
    binding = bind(spec(["mask", "features", "scale"], ["probs", "embedding"]), ARGS)
    assert binding.inputs == ("features", "mask", "scale")
    assert binding.results(["p", "e"]) == {"probs": "p", "embedding": "e"}
    assert binding.results({"embedding": "e", "probs": "p", "extra": "x"}) == {
        "probs": "p", "embedding": "e"}
    single = bind(spec(["features", "mask"], ["probs"]), ARGS)
    assert single.results("tensor") == {"probs": "tensor"}


def test_results_without_the_declared_outputs_are_backend_errors() -> None:
    binding = bind(spec(["features", "mask"], ["probs", "embedding"]), ARGS)
    with pytest.raises(BackendError, match=r"returned 1 tensor\(s\); config output "
                                           r"'embedding' is result 1"):
        binding.results(("p",))
    with pytest.raises(BackendError, match=r"returned outputs \['probs'\], without "
                                           r"\['embedding'\]"):
        binding.results({"probs": "p"})


@pytest.mark.parametrize(("inputs", "message"), [
    (["features", "bias"], r"input 'bias' is neither named <name>__<index> \(INPUT__0\) nor an "
                           r"argument of the model's forward, which takes \['features', 'mask', "
                           r"'scale'\]"),
    (["INPUT__0", "features"], r"input 'features' and input 'INPUT__0' are both forward "
                               r"argument 0"),
    (["INPUT__0", "INPUT__2"], r"the config's inputs are forward arguments \[0, 2\].*without "
                               r"gaps"),
    (["features"], r"forward takes \['features', 'mask', 'scale'\] \(2 without a default\)"),
])
def test_inputs_that_match_no_argument_fail_the_load(inputs: list[str], message: str) -> None:
    with pytest.raises(ModelLoadError, match=message):
        bind(spec(inputs, ["y"]), ARGS)


def test_optional_inputs_are_refused() -> None:
    with pytest.raises(ModelLoadError, match="optional inputs are not supported"):
        bind(spec(["features", "mask"], ["y"], optional=True), ARGS)
