"""One PyTorch instance: its module on its device, run under ``torch.inference_mode`` on the
thread the scheduler gives it; on a GPU its own CUDA stream, page-locked staging buffers and,
with ``cuda_graphs``, one CUDA graph per batch shape."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from server.backends.pytorch.binding import Binding
from server.backends.pytorch.library import torch_dtype
from server.errors import BackendError
from server.spec import ModelSpec
from server.types import Array, DataType

log = logging.getLogger(__package__)

#: Most distinct batch shapes one instance captures CUDA graphs for (as the TensorRT backend).
MAX_GRAPHS = 64
#: Runs of a new shape before its capture: kernels chosen and workspaces allocated outside it.
GRAPH_WARMUP_RUNS = 2


@dataclass(frozen=True, slots=True)
class _Tensor:
    name: str
    datatype: DataType
    dtype: Any  # torch's


@dataclass(slots=True)
class _Graph:
    graph: Any
    inputs: list[Any]  # the static device tensors the graph reads
    outputs: dict[str, Any]  # and writes


class PyTorchInstance:
    """One module on one device. Blocking; never run concurrently (the scheduler's contract).

    On the CPU the inputs are wrapped without a copy (read-only request memory is copied
    first: a model may write into its inputs). On a GPU a batch is: inputs copied into this
    instance's pinned staging buffers, async copies to the device on the instance's stream,
    the forward (or the batch shape's CUDA graph), async copies back into pinned buffers, one
    stream synchronisation, outputs copied out (the next batch reuses the buffers).
    """

    def __init__(self, torch: Any, module: Any, spec: ModelSpec, binding: Binding,
                 device: str, kind: str, cuda_graphs: bool = False) -> None:
        self._torch = torch
        self._module = module
        self._binding = binding
        self._device = torch.device(device)
        self._on_gpu = self._device.type == "cuda"
        self._inputs = [_Tensor(t.name, t.datatype, torch_dtype(torch, t.datatype, t.name))
                        for t in spec.inputs]
        self._outputs = {t.name: _Tensor(t.name, t.datatype,
                                         torch_dtype(torch, t.datatype, t.name))
                         for t in spec.outputs}
        self._stream: Any = None
        self._staging: dict[str, Any] = {}  # pinned uint8 buffers, by tensor name
        self._graphs_on = cuda_graphs and self._on_gpu
        self._graphs: dict[tuple[tuple[int, ...], ...], _Graph] = {}
        self._seen: dict[tuple[tuple[int, ...], ...], int] = {}
        self._uncapturable: set[tuple[tuple[int, ...], ...]] = set()
        flags = [kind]
        if self._on_gpu:
            self._stream = torch.cuda.Stream(device=self._device)
            name = torch.cuda.get_device_name(self._device)
            where = f"{self._device} {name}"
            if self._graphs_on:
                flags.append("cuda graphs")
        else:
            where = "cpu"
        self._description = f"pytorch {torch.__version__} ({', '.join(flags)}) on {where}"

    @property
    def description(self) -> str:
        return self._description

    def warmup(self, inputs: Mapping[str, Array]) -> None:
        self.execute(inputs)

    def execute(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        try:
            if self._on_gpu:
                return self._execute_gpu(inputs)
            return self._execute_cpu(inputs)
        except BackendError:
            raise
        except Exception as exc:  # the model's own failure, whatever torch raised
            raise BackendError(f"the PyTorch model failed: {type(exc).__name__}: {exc}") from exc

    # -- CPU ---------------------------------------------------------------------------------

    def _execute_cpu(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        torch = self._torch
        tensors = {}
        for tensor in self._inputs:
            array = np.ascontiguousarray(inputs[tensor.name])
            if not array.flags.writeable:
                array = array.copy()
            tensors[tensor.name] = self._as_dtype(torch.from_numpy(array), tensor)
        with torch.inference_mode():
            result = self._module(*self._binding.arguments(tensors))
        return {name: self._to_numpy(value.detach().cpu(), self._outputs[name])
                for name, value in self._checked(result).items()}

    # -- GPU ---------------------------------------------------------------------------------

    def _execute_gpu(self, inputs: Mapping[str, Array]) -> dict[str, Array]:
        torch = self._torch
        stream = self._stream
        with torch.cuda.device(self._device), torch.cuda.stream(stream), \
                torch.inference_mode():
            device_inputs = {}
            for tensor in self._inputs:
                host = self._stage(tensor, inputs[tensor.name])
                device_inputs[tensor.name] = host.to(self._device, non_blocking=True)
            key = tuple(tuple(int(d) for d in inputs[t.name].shape) for t in self._inputs)
            results = self._run_gpu(key, device_inputs)
            staged = {}
            for name, value in results.items():
                host = self._staging_buffer(f"out:{name}", value.numel() * value.element_size())
                host = host.view(value.dtype).view(value.shape)
                host.copy_(value, non_blocking=True)
                staged[name] = host
            stream.synchronize()
            return {name: self._to_numpy(host, self._outputs[name]).copy()
                    for name, host in staged.items()}

    def _run_gpu(self, key: tuple[tuple[int, ...], ...],
                 device_inputs: dict[str, Any]) -> dict[str, Any]:
        """The forward on the instance's stream: the shape's graph once captured."""
        captured = self._graphs.get(key)
        if captured is not None:
            for static, tensor in zip(captured.inputs, self._inputs, strict=True):
                static.copy_(device_inputs[tensor.name], non_blocking=True)
            captured.graph.replay()
            return captured.outputs
        results = self._checked(self._module(*self._binding.arguments(device_inputs)))
        if self._graphs_on and key not in self._uncapturable and len(self._graphs) < MAX_GRAPHS:
            self._seen[key] = self._seen.get(key, 0) + 1
            if self._seen[key] >= GRAPH_WARMUP_RUNS:
                self._capture(key, device_inputs)
        return results

    def _capture(self, key: tuple[tuple[int, ...], ...], device_inputs: dict[str, Any]) -> None:
        """Record the forward of this shape on static input tensors (copies of this batch's);
        a shape that cannot be captured runs without a graph from then on."""
        torch = self._torch
        self._uncapturable.add(key)  # until captured: one attempt per shape
        static = [device_inputs[t.name].clone() for t in self._inputs]
        graph = torch.cuda.CUDAGraph()
        try:
            # Thread-local: other instances' threads go on with their CUDA work meanwhile.
            with torch.cuda.graph(graph, stream=self._stream,
                                  capture_error_mode="thread_local"):
                outputs = self._checked(self._module(*self._binding.arguments(
                    {t.name: s for t, s in zip(self._inputs, static, strict=True)})))
        except Exception as exc:
            log.info("pytorch runs this shape without a cuda graph (not capturable)",
                     extra={"shapes": str(key), "error": repr(exc)})
            return
        self._uncapturable.discard(key)
        self._graphs[key] = _Graph(graph, static, outputs)

    def _stage(self, tensor: _Tensor, value: Array) -> Any:
        """``value`` in this instance's pinned buffer for ``tensor``, as a torch tensor."""
        array = np.asarray(value)
        host = self._staging_buffer(tensor.name, array.nbytes)
        staged = host.numpy().view(array.dtype).reshape(array.shape)
        np.copyto(staged, array, casting="no")
        return self._as_dtype(self._torch.from_numpy(staged), tensor)

    def _staging_buffer(self, name: str, nbytes: int) -> Any:
        """The first ``nbytes`` of the pinned buffer ``name``, grown (doubled) when short."""
        buffer = self._staging.get(name)
        if buffer is None or buffer.numel() < nbytes:
            size = max(nbytes, 2 * (buffer.numel() if buffer is not None else 0), 1)
            buffer = self._torch.empty(size, dtype=self._torch.uint8, pin_memory=True)
            self._staging[name] = buffer
        return buffer[:nbytes]

    # -- both --------------------------------------------------------------------------------

    def _as_dtype(self, value: Any, tensor: _Tensor) -> Any:
        """A wire tensor as the model's type: BF16 words (uint16) reinterpreted."""
        if tensor.datatype is DataType.BF16:
            return value.view(self._torch.bfloat16)
        return value

    def _checked(self, result: Any) -> dict[str, Any]:
        """The config's outputs from forward's result, each a tensor of the config's type."""
        found = self._binding.results(result)
        for name, value in found.items():
            expected = self._outputs[name]
            dtype = getattr(value, "dtype", None)
            if dtype != expected.dtype:
                got = "not a tensor" if dtype is None else str(dtype).removeprefix("torch.")
                raise BackendError(
                    f"the PyTorch model's output '{name}' is {got}, but the config declares "
                    f"{expected.datatype.config_name}"
                )
        return found

    def _to_numpy(self, value: Any, tensor: _Tensor) -> Array:
        if tensor.datatype is DataType.BF16:
            value = value.view(self._torch.uint16)
        array: Array = value.numpy()
        return array

    def close(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()
        self._graphs.clear()
        self._staging.clear()
        self._module = None
