"""The GPU checks that need no TensorRT and no onnxruntime-gpu (which the GPU machines we get
lack): the CUDA layer's round trips and graph capture (server/backends/tensorrt/cuda.py, on
cuda-bindings 13 or cuda-python 12), and the TensorRT instance's real staging, copy and CUDA
graph path driven by a stand-in engine whose ``execute_async_v3`` launches a CuPy kernel
(y = 2x + 1) on the instance's own stream. bench/gpu_check.sh runs it with the rest.

    python -m bench.studies.gpu_check --out checks.json

Writes one JSON document: per check ``ok`` (true or false) with what it saw, or ``skipped``
with why (no CUDA device, no CuPy). Exits 1 when a check that ran failed.
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from server.backends.tensorrt import cuda

#: Rows of each batch the stand-in engine runs, in order: repeats replay captured graphs.
BATCHES = (1, 3, 8, 3, 1, 8, 5, 5)


def cuda_problem() -> str | None:
    try:
        count, why = cuda.device_count()
    except Exception as exc:  # the bindings are missing
        return str(exc)
    return None if count else f"no CUDA device: {why}"


def check_cuda_layer() -> dict[str, Any]:
    """Pinned and device buffers, copies both ways on a stream, the pinned test, the pool's
    pinned allocator, and a captured graph of two copies replayed on new data."""
    cuda.set_device(0)
    gpu = cuda.identity(0)
    nbytes = 1 << 20
    device, source, target = (cuda.DeviceBuffer(nbytes), cuda.PinnedBuffer(nbytes),
                              cuda.PinnedBuffer(nbytes))
    stream = cuda.Stream()
    try:
        sent = source.view(np.dtype(np.float32), (nbytes // 4,))
        got = target.view(np.dtype(np.float32), (nbytes // 4,))
        sent[:] = np.arange(nbytes // 4, dtype=np.float32)
        stream.copy_to_device(device.ptr, source.ptr, nbytes)
        stream.copy_to_host(target.ptr, device.ptr, nbytes)
        stream.synchronize()
        round_trip = bool(np.array_equal(got, sent))
        pooled = cuda.pinned_allocator(4096)
        # The pool's blocks are known pinned (a lookup); other memory, page-locked or not, is
        # staged.
        pinned = [cuda.is_pinned(pooled), cuda.is_pinned(pooled[1024:2048]),
                  not cuda.is_pinned(np.ones(8))]

        def work() -> bool:
            stream.copy_to_device(device.ptr, source.ptr, nbytes)
            stream.copy_to_host(target.ptr, device.ptr, nbytes)
            return True

        graph = cuda.Graph.capture(stream, work)
        replayed = False
        if graph is not None:
            sent[:] = -sent
            got[:] = 0
            graph.launch(stream)
            stream.synchronize()
            replayed = bool(np.array_equal(got, sent))
            graph.destroy()
    finally:
        stream.destroy()
        for buffer in (device, source, target):
            buffer.free()
    return {"ok": round_trip and all(pinned) and replayed, "gpu": gpu.name,
            "round_trip": round_trip, "pinned_checks": pinned, "graph_captured": graph is not None,
            "graph_replayed": replayed}


class _Engine:
    """The TensorRT engine calls TensorRtInstance makes: x FP32 [-1, 4] -> y, batch 1..8."""

    num_io_tensors = 2
    device_memory_size_v2 = 1 << 16

    def __init__(self, launch: Callable[[int, int, int, int], None]) -> None:
        self.launch = launch

    def get_tensor_name(self, i: int) -> str:
        return ["x", "y"][i]

    def get_tensor_mode(self, name: str) -> str:
        return "INPUT" if name == "x" else "OUTPUT"

    def get_tensor_dtype(self, name: str) -> SimpleNamespace:
        return SimpleNamespace(name="FLOAT")

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return (-1, 4)

    def get_tensor_profile_shape(self, name: str, profile: int) -> list[tuple[int, ...]]:
        return [(1, 4), (8, 4), (8, 4)]

    def create_execution_context(self, strategy: object = None) -> _Context:
        return _Context(self.launch)


class _Context:
    def __init__(self, launch: Callable[[int, int, int, int], None]) -> None:
        self.launch = launch
        self.shape: tuple[int, ...] = (8, 4)
        self.addresses: dict[str, int] = {}

    def set_device_memory(self, ptr: int, size: int) -> None:
        pass

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        self.shape = tuple(shape)
        return len(shape) == 2 and 1 <= shape[0] <= 8 and shape[1] == 4

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return self.shape

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        self.launch(stream, self.addresses["x"], self.addresses["y"], self.shape[0] * 4)
        return True


def _cupy_launcher() -> Callable[[int, int, int, int], None]:
    import cupy

    kernel = cupy.ElementwiseKernel("float32 x", "float32 y", "y = 2 * x + 1", "affine")

    def wrap(ptr: int, count: int) -> Any:
        memory = cupy.cuda.UnownedMemory(ptr, count * 4, None, 0)
        return cupy.ndarray((count,), cupy.float32, cupy.cuda.MemoryPointer(memory, 0))

    def launch(stream: int, x: int, y: int, count: int) -> None:
        with cupy.cuda.ExternalStream(stream):
            kernel(wrap(x, count), wrap(y, count))

    return launch


def check_tensorrt_instance(graphs: bool) -> dict[str, Any]:
    """TensorRtInstance on real CUDA buffers and its own stream, the stand-in engine's work a
    CuPy kernel: every batch's y must be 2x + 1 (with graphs: captured and replayed)."""
    from server.accelerator_options import TrtOptions
    from server.backends.tensorrt.builder import EngineRecord
    from server.backends.tensorrt.engine_cache import GpuIdentity
    from server.backends.tensorrt.runtime import TensorRtInstance
    from server.spec import BatchingSpec, InstanceSpec, ModelSpec, TensorSpec
    from server.types import DataType

    trt = SimpleNamespace(__version__="stand-in", TensorIOMode=SimpleNamespace(INPUT="INPUT"),
                          ExecutionContextAllocationStrategy=SimpleNamespace(
                              USER_MANAGED="USER_MANAGED"))
    spec = ModelSpec(name="affine", platform="tensorrt_plan", backend="tensorrt",
                     max_batch_size=8, inputs=(TensorSpec("x", DataType.FP32, (4,)),),
                     outputs=(TensorSpec("y", DataType.FP32, (4,)),),
                     batching=BatchingSpec(enabled=True), instances=(InstanceSpec("GPU", 1),))
    instance = TensorRtInstance(trt, object(), _Engine(_cupy_launcher()), spec, 0,
                                TrtOptions(cuda_graphs=graphs), GpuIdentity("gpu", (0, 0)),
                                EngineRecord(b"", "built", Path("stand-in.plan")))
    wrong = []
    try:
        for step, rows in enumerate(BATCHES):
            x = np.random.default_rng(step).standard_normal((rows, 4)).astype(np.float32)
            y = instance.execute({"x": x})["y"]
            if not np.array_equal(y, 2 * x + 1):
                wrong.append({"step": step, "rows": rows})
        captured = len(instance._graphs)  # the graphs are what this check is about
    finally:
        instance.close()
    expected = len(set(BATCHES)) if graphs else 0
    return {"ok": not wrong and captured == expected, "batches": list(BATCHES),
            "wrong": wrong, "graphs_captured": captured, "graphs_expected": expected}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.studies.gpu_check",
                                     description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    problem = cuda_problem()
    try:
        import cupy  # noqa: F401

        no_cupy = None
    except ImportError as exc:
        no_cupy = f"cupy is not installed: {exc}"
    checks: dict[str, Callable[[], dict[str, Any]]] = {
        "cuda_layer": check_cuda_layer,
        "tensorrt_instance": lambda: check_tensorrt_instance(graphs=False),
        "tensorrt_instance_graphs": lambda: check_tensorrt_instance(graphs=True),
    }
    results: dict[str, Any] = {}
    for name, check in checks.items():
        why = problem or (no_cupy if name.startswith("tensorrt") else None)
        if why is not None:
            results[name] = {"skipped": why}
            continue
        try:
            results[name] = check()
        except Exception as exc:
            results[name] = {"ok": False, "error": repr(exc), "trace": traceback.format_exc()}
        print(f"{name}: {'ok' if results[name]['ok'] else 'FAILED'}", file=sys.stderr)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return 1 if any(r.get("ok") is False for r in results.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
