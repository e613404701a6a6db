"""Checks a decoded request against the model's spec, naming what is wrong."""

from __future__ import annotations

from server.classification import CLASSIFIABLE, unsupported_type
from server.errors import InvalidInput
from server.spec import ModelSpec
from server.types import InferRequest


def validate_request(request: InferRequest, spec: ModelSpec) -> None:
    """Checks against the inputs as clients send them (``spec.client_inputs``: a preprocessed
    input is a uint8 image there), then each image's size against the preprocessing."""
    model = f"model '{spec.name}'"
    for declared in spec.client_inputs:
        if declared.name not in request.inputs and not declared.optional:
            raise InvalidInput(
                f"{model} expects input '{declared.name}', which the request does not carry"
            )
    batch: int | None = None
    for name, value in request.inputs.items():
        tensor = spec.client_input(name)
        if tensor is None:
            expected = [t.name for t in spec.client_inputs]
            raise InvalidInput(f"unexpected input '{name}' for {model}; its inputs are {expected}")
        datatype = request.input_types[name]
        if datatype is not tensor.datatype:
            raise InvalidInput(
                f"input '{name}' has datatype {datatype.wire}; {model} expects "
                f"{tensor.datatype.wire}"
            )
        shape = value.shape
        dims = tensor.dims
        if spec.batches:
            if len(shape) != len(dims) + 1:
                raise InvalidInput(
                    f"input '{name}' has shape {list(shape)}; {model} expects "
                    f"[batch, {', '.join(map(str, dims))}]".replace(", ]", "]")
                )
            rows = int(shape[0])
            if rows > spec.max_batch_size:
                raise InvalidInput(
                    f"input '{name}' batch size {rows} exceeds max_batch_size "
                    f"{spec.max_batch_size} of {model}"
                )
            if batch is None:
                batch = rows
            elif rows != batch:
                raise InvalidInput(
                    f"input '{name}' has batch size {rows} but another input has {batch}"
                )
            shape = shape[1:]
        elif len(shape) != len(dims):
            raise InvalidInput(
                f"input '{name}' has shape {list(shape)}; {model} expects {list(dims)}"
            )
        for got, want in zip(shape, dims, strict=True):
            if want != -1 and got != want:
                raise InvalidInput(
                    f"input '{name}' has shape {list(value.shape)}; {model} expects dims "
                    f"{list(dims)}" + (" after the batch dimension" if spec.batches else "")
                )
        pre = spec.preprocess
        if pre is not None and name == pre.input:
            model_input = spec.input(name)
            assert model_input is not None
            problem = pre.image_problem(int(shape[0]), int(shape[1]), model_input)
            if problem is not None:
                raise InvalidInput(f"input '{name}': {problem} for {model}")
    if request.requested_outputs:
        for name in request.requested_outputs:
            output = spec.output(name)
            if output is None:
                expected = [t.name for t in spec.outputs]
                raise InvalidInput(
                    f"requested output '{name}' is not an output of {model}; "
                    f"its outputs are {expected}"
                )
            if (request.classification and name in request.classification
                    and output.datatype not in CLASSIFIABLE):
                raise InvalidInput(
                    f"{unsupported_type(output.datatype)} (output '{name}' of {model})")
