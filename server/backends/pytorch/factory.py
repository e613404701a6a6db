"""The PyTorch backend factory: the device of each instance, the model file, the config
against the program, the instance and its warm-up on a GPU."""

from __future__ import annotations

import itertools
import logging
from pathlib import Path
from typing import Any

import numpy as np

from server.accelerator_options import instance_device, instance_group
from server.backends.pytorch.binding import bind
from server.backends.pytorch.library import fp32_without_tf32, import_torch, torch_dtype
from server.backends.pytorch.program import Program, load_program
from server.backends.pytorch.runtime import GRAPH_WARMUP_RUNS, PyTorchInstance
from server.errors import ModelLoadError
from server.parameters import Key, boolean
from server.security.paths import confined
from server.spec import ModelSpec

log = logging.getLogger(__package__)

CUDA_GRAPHS = Key("cuda_graphs", boolean,
                  "on a GPU, capture one CUDA graph per batch shape and replay it", "false")
#: config.pbtxt ``parameters`` keys this backend owns.
PARAMETER_KEYS = (CUDA_GRAPHS,)


class PyTorchFactory:
    """Loads PyTorch instances (``platform: "pytorch_libtorch"``, ``backend: "pytorch"``)."""

    parameter_keys = PARAMETER_KEYS

    def model_path(self, spec: ModelSpec, version_dir: str) -> Path:
        path = confined(Path(version_dir), spec.default_model_filename, "default_model_filename",
                        "the version directory")
        if not path.is_file():
            raise ModelLoadError(f"model file '{path}' is missing")
        return path

    def complete_spec(self, spec: ModelSpec, version_dir: str) -> ModelSpec:
        """Nothing to complete: a PyTorch model file does not say its tensors' types and
        shapes (as in Triton, the config declares them). The config is checked against the
        program's forward (and a torch.export program's types and ranks) here, on the CPU."""
        if not spec.inputs or not spec.outputs:
            raise ModelLoadError(
                f"model '{spec.name}': a PyTorch model needs its inputs and outputs declared "
                "in config.pbtxt (the model file does not name their types and shapes)"
            )
        torch = import_torch()
        program = load_program(torch, self.model_path(spec, version_dir), "cpu")
        check_program(torch, spec, program)
        return spec

    def load(self, spec: ModelSpec, version_dir: str, instance_index: int) -> PyTorchInstance:
        torch = import_torch()
        device = _device(torch, spec, instance_index)
        if device != "cpu":
            fp32_without_tf32(torch)
        program = load_program(torch, self.model_path(spec, version_dir), device)
        binding = check_program(torch, spec, program)
        instance = PyTorchInstance(torch, program.module, spec, binding, device, program.kind,
                                   CUDA_GRAPHS.value(spec.parameters, spec.name))
        try:
            if device != "cpu":
                _warm_up(spec, instance)
        except BaseException:
            instance.close()
            raise
        log.info("pytorch instance loaded", extra={
            "model": spec.name, "instance": instance_index, "runtime": instance.description})
        return instance


def check_program(torch: Any, spec: ModelSpec, program: Program) -> Any:
    """The binding of the config to the program; for a torch.export program also each
    input's type and rank as exported. Raises ModelLoadError."""
    binding = bind(spec, program.args)
    by_name = {t.name: t for t in spec.inputs}
    for name, arg in zip(binding.inputs, program.args, strict=False):
        tensor = by_name[name]
        where = f"model '{spec.name}' input '{name}'"
        dtype = torch_dtype(torch, tensor.datatype, where)
        if arg.dtype is not None and arg.dtype != dtype:
            raise ModelLoadError(f"{where} is {tensor.datatype.config_name} in the config but "
                                 f"{str(arg.dtype).removeprefix('torch.')} in the program")
        rank = len(tensor.dims) + (1 if spec.batches else 0)
        if arg.rank is not None and arg.rank != rank:
            raise ModelLoadError(
                f"{where} has {rank} dims in the config"
                + (" (with the batch dimension)" if spec.batches else "")
                + f" but {arg.rank} in the program"
            )
    for tensor in spec.outputs:
        torch_dtype(torch, tensor.datatype, f"model '{spec.name}' output '{tensor.name}'")
    return binding


def _device(torch: Any, spec: ModelSpec, instance_index: int) -> str:
    """The instance's device: "cpu" for KIND_CPU, "cuda:<gpu>" for KIND_GPU (its group's
    gpus in turn), KIND_AUTO a GPU when CUDA is there. KIND_GPU without CUDA, or naming a GPU
    that is not there, is a load error: never a silent run on the CPU."""
    group, _ = instance_group(spec, instance_index)
    has_cuda = bool(torch.cuda.is_available())
    if group.kind == "CPU" or (group.kind == "AUTO" and not has_cuda):
        return "cpu"
    if not has_cuda:
        raise ModelLoadError(
            f"model '{spec.name}': instance_group kind KIND_GPU needs CUDA, but torch "
            f"{torch.__version__} sees no CUDA device (a CPU-only build, or no GPU here)"
        )
    gpu = instance_device(spec, instance_index)
    count = int(torch.cuda.device_count())
    if not 0 <= gpu < count:
        raise ModelLoadError(f"model '{spec.name}': CUDA device {gpu} does not exist; this "
                             f"machine has {count}")
    return f"cuda:{gpu}"


def _warm_up(spec: ModelSpec, instance: PyTorchInstance) -> None:
    """On a GPU the first runs of a shape pay for kernel selection, workspaces and (with
    cuda_graphs) the capture: run zeros of batch 1, each preferred size and the largest,
    enough times to capture, before the version takes requests. Only inputs whose dims are
    all fixed can be made up; a model with -1 dims warms up through model_warmup."""
    if any(d < 0 for t in spec.inputs for d in t.dims):
        return
    sizes = sorted({1, *spec.batching.preferred_batch_sizes, spec.max_batch_size}
                   if spec.batches else {0})
    for rows, _ in itertools.product(sizes, range(GRAPH_WARMUP_RUNS + 1)):
        instance.warmup({
            t.name: np.zeros(((rows,) if spec.batches else ()) + t.dims,
                             dtype=t.datatype.numpy_dtype)
            for t in spec.inputs
        })
