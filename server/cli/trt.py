"""``peregrine trt build``: build a model's TensorRT engine ahead of serving, into the engine
cache the server reads (so the first load does not spend minutes building).

    peregrine trt build --model-repository DIR --model NAME [--version V] [--precision fp16]
                        [--device 0] [--rebuild] [--output PATH]

The model is a ``tensorrt_plan`` model with ``trt_build_from_onnx: "true"`` (the engine lands
exactly where its server load looks for it), or an ONNX Runtime model (its model.onnx is
built with the flags given here; ``--output`` then writes a model.plan for a TensorRT model).
A progress bar is drawn on stderr; the result (engine path, cache or built, seconds) is
printed on stdout as JSON. TensorRT and the GPU are only imported when a build starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from types import MappingProxyType
from typing import Any, Protocol, TextIO, runtime_checkable

from server.accelerator_options import TRT_BUILD_FROM_ONNX, TRT_PRECISION, TRT_SHAPE
from server.errors import ModelLoadError
from server.spec import ModelSpec


@runtime_checkable
class EngineBuilder(Protocol):
    """What this command needs of the TensorRT backend factory (registered in server.app)."""

    progress_stream: TextIO | None

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec: ...

    def engine(self, spec: ModelSpec, version_dir: Path, device: int = 0,
               rebuild: bool = False) -> tuple[Any, Any]: ...


def add_trt_parser(commands: Any) -> None:
    trt = commands.add_parser(
        "trt", help="TensorRT engines: build (and cache) a model's engine ahead of serving",
        description="TensorRT engine tools. Needs the 'gpu' extra and a CUDA device.",
    )
    sub = trt.add_subparsers(dest="trt_command", required=True)
    build = sub.add_parser(
        "build", help="build a model's engine from its model.onnx into the engine cache",
        description="Build the TensorRT engine of a model from its model.onnx into the engine "
        "cache (trt_engine_cache_dir, $PEREGRINE_TRT_CACHE_DIR or ~/.cache/peregrine/tensorrt)"
        ", drawing build progress on stderr. An engine already cached for this model, "
        "TensorRT, GPU and settings is reused unless --rebuild.",
    )
    build.add_argument("--model-repository", type=Path, required=True,
                       help="the model repository directory")
    build.add_argument("--model", required=True, help="the model's name (its directory)")
    build.add_argument("--version", default="",
                       help="the version directory (default: the highest numbered)")
    build.add_argument("--precision", default="",
                       help="fp32, fp16, bf16, int8 or a set such as int8,fp16 (default: the "
                       "config's trt_precision; fp32 for an ONNX Runtime model)")
    build.add_argument("--device", type=int, default=-1,
                       help="CUDA device to build on (default: the model's first instance GPU)")
    build.add_argument("--rebuild", action="store_true",
                       help="build even when the cache has this engine")
    build.add_argument("--output", type=Path, default=None,
                       help="also copy the engine to this file (e.g. <model>/1/model.plan)")


def run_trt(args: argparse.Namespace, factories: Any) -> int:
    """``factories`` is server.app.backend_factories (the composition root owns backends)."""
    if args.trt_command != "build":
        raise AssertionError(f"unhandled trt command {args.trt_command}")
    try:
        result = build(args, factories())
    except (ModelLoadError, ValueError, OSError) as exc:
        print(f"peregrine trt build: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result, indent=2))
    return 0


def build(args: argparse.Namespace, factories: dict[str, Any]) -> dict[str, Any]:
    from server.accelerator_options import instance_device
    from server.repository import model_config as config_io

    factory = factories.get("tensorrt")
    if not isinstance(factory, EngineBuilder):
        raise ModelLoadError("this server has no TensorRT backend registered")
    model_dir = args.model_repository / args.model
    if not model_dir.is_dir():
        raise ModelLoadError(f"'{model_dir}' is not a model directory")
    version_dir = _version_dir(model_dir, args.version)
    spec = config_io.to_spec(config_io.read_config(model_dir), model_dir)
    spec = _as_onnx_build(spec, args.precision)
    spec = factory.complete_spec(spec, str(version_dir))
    if not (model_dir / config_io.CONFIG_FILE).exists():
        spec = config_io.with_default_batching(spec)
    device = args.device if args.device >= 0 else instance_device(spec, 0)
    factory.progress_stream = sys.stderr
    record, gpu = factory.engine(spec, version_dir, device, rebuild=args.rebuild)
    result: dict[str, Any] = {
        "model": spec.name,
        "version": version_dir.name,
        "engine": str(record.path),
        "source": record.source,
        "build_seconds": round(record.seconds, 1),
        "bytes": len(record.data),
        "precision": ",".join(TRT_PRECISION.value(spec.parameters, spec.name)),
        "gpu": gpu.name,
        "device": device,
    }
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(record.path, args.output)
        result["output"] = str(args.output)
    return result


def _version_dir(model_dir: Path, version: str) -> Path:
    if version:
        path = model_dir / version
        if not path.is_dir():
            raise ModelLoadError(f"model version directory '{path}' does not exist")
        return path
    versions = sorted((p for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                      key=lambda p: int(p.name))
    if not versions:
        raise ModelLoadError(f"model '{model_dir.name}' has no numeric version directory")
    return versions[-1]


def _as_onnx_build(spec: ModelSpec, precision: str) -> ModelSpec:
    """The spec of an engine build from model.onnx, with ``--precision`` applied."""
    try:
        wanted = TRT_PRECISION.parse(precision) if precision else None
    except ValueError as exc:
        raise ModelLoadError(f"--precision must be {exc}, got {precision!r}") from None
    if spec.backend == "tensorrt":
        if not TRT_BUILD_FROM_ONNX.value(spec.parameters, spec.name):
            raise ModelLoadError(
                f"model '{spec.name}' serves a prebuilt {spec.default_model_filename}; set "
                "parameter trt_build_from_onnx to \"true\" (with a model.onnx) to build it"
            )
        configured = TRT_PRECISION.value(spec.parameters, spec.name)
        if wanted is None or wanted == configured:
            return spec
        print(f"peregrine trt build: note: --precision {precision} differs from the "
              f"config's trt_precision '{','.join(configured)}'; the server uses this engine "
              "only when the config asks for the same precision", file=sys.stderr)
        params = {**spec.parameters, TRT_PRECISION.name: precision}
        return dataclasses.replace(spec, parameters=MappingProxyType(params))
    # An ONNX Runtime model: build its model.onnx with this command's flags only.
    params = {k: v for k, v in spec.parameters.items() if TRT_SHAPE.owns(k)}
    params[TRT_BUILD_FROM_ONNX.name] = "true"
    if precision:
        params[TRT_PRECISION.name] = precision
    groups = tuple(g if g.kind != "CPU" else dataclasses.replace(g, kind="GPU")
                   for g in spec.instances)
    return dataclasses.replace(spec, backend="tensorrt", platform="tensorrt_plan",
                               parameters=MappingProxyType(params), instances=groups,
                               default_model_filename="model.onnx")
