"""Builders shared by the drift tests: specs, profiles, fake loaded models and samples."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from server.drift import features
from server.drift import options as drift_config
from server.drift import profile as profiles
from server.interfaces import DriftSample
from server.spec import ModelSpec, TensorSpec
from server.types import Array, DataType, InferRequest, InferResponse, OutputTensor


def make_spec(
    name: str = "m",
    inputs: tuple[TensorSpec, ...] = (TensorSpec("x", DataType.FP32, (64,)),),
    outputs: tuple[TensorSpec, ...] = (TensorSpec("label", DataType.INT64, (1,)),),
    parameters: Mapping[str, str] | None = None,
    max_batch_size: int = 8,
) -> ModelSpec:
    return ModelSpec(
        name=name, platform="onnxruntime_onnx", backend="onnxruntime",
        max_batch_size=max_batch_size, inputs=inputs, outputs=outputs,
        parameters=MappingProxyType(
            dict(parameters if parameters is not None else {"drift_sample_rate": "1"})
        ),
    )


def make_profile(spec: ModelSpec, data: Mapping[str, Array],
                 version: str = "1") -> profiles.ReferenceProfile:
    config = drift_config.parse(spec.parameters, spec.name)
    return profiles.build(spec.name, version, features.layouts(spec, config), data)


@dataclass
class FakeModel:
    """What the dataplane hands the sink: a spec and a version (LoadedModel's read side)."""

    spec: ModelSpec
    version: str = "1"


def sample(model: FakeModel, inputs: Mapping[str, Array], outputs: Mapping[str, Array],
           request_id: str = "") -> DriftSample:
    types = {t.name: t.datatype for t in model.spec.inputs}
    out_types = {t.name: t.datatype for t in model.spec.outputs}
    request = InferRequest(model.spec.name, model.version, request_id, dict(inputs),
                           {n: types[n] for n in inputs})
    response = InferResponse(model.spec.name, model.version, request_id,
                             [OutputTensor(n, out_types[n], v) for n, v in outputs.items()])
    return DriftSample(model, request, response)
