"""A thin layer over the CUDA runtime through cuda-python (the `gpu` extra), imported lazily.

The same bindings TensorRT's own Python samples use (``cuda.bindings.runtime``; older
releases name it ``cuda.cudart``). Importing this module needs nothing; the first call that
needs CUDA imports the bindings and raises ModelLoadError when they are missing.

Every cuda-python call returns ``(error, *values)``; ``check`` turns an error into CudaError.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import threading
import weakref
from collections.abc import Callable
from typing import Any

import numpy as np

from server.backends.tensorrt.engine_cache import GpuIdentity
from server.errors import ModelLoadError
from server.types import Array

_lock = threading.Lock()
_runtime: Any = None


class CudaError(RuntimeError):
    """A CUDA runtime call failed."""


def runtime() -> Any:
    """The cuda-python runtime module. Raises ModelLoadError when cuda-python is missing."""
    global _runtime
    if _runtime is not None:
        return _runtime
    with _lock:
        if _runtime is None:
            try:
                from cuda.bindings import runtime as cudart
            except ImportError:
                try:
                    from cuda import cudart
                except ImportError as exc:
                    raise ModelLoadError(
                        "cuda-python is not installed (it comes with the 'gpu' extra: pip "
                        f"install 'peregrine[gpu]'): {exc}"
                    ) from None
            _runtime = cudart
    return _runtime


def _code(err: Any) -> int:
    return int(getattr(err, "value", err))


def error_name(err: Any) -> str:
    cudart = runtime()
    try:
        name = cudart.cudaGetErrorName(err)[1]
        return name.decode() if isinstance(name, bytes) else str(name)
    except Exception:
        return f"cudaError {_code(err)}"


def check(result: Any) -> Any:
    """The value(s) of a cuda-python call; raises CudaError for an error code."""
    if isinstance(result, tuple):
        err, values = result[0], result[1:]
    else:
        err, values = result, ()
    if _code(err) != 0:
        raise CudaError(error_name(err))
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_count() -> tuple[int, str]:
    """(number of CUDA devices, why there are none); 0 without a driver or a device."""
    cudart = runtime()
    result = cudart.cudaGetDeviceCount()
    if _code(result[0]) != 0:
        return 0, error_name(result[0])
    count = int(result[1])
    return count, "" if count else "cudaGetDeviceCount found no device"


def require_device(device: int) -> None:
    """Raise ModelLoadError unless CUDA device ``device`` exists."""
    count, why = device_count()
    if count == 0:
        raise ModelLoadError(f"no CUDA device: {why}")
    if not 0 <= device < count:
        raise ModelLoadError(
            f"CUDA device {device} does not exist; this machine has {count} "
            f"(instance_group gpus must be within 0..{count - 1})"
        )


def set_device(device: int) -> None:
    check(runtime().cudaSetDevice(device))


def identity(device: int) -> GpuIdentity:
    prop = check(runtime().cudaGetDeviceProperties(device))
    raw = prop.name
    name = raw.split(b"\0", 1)[0].decode(errors="replace") if isinstance(raw, bytes) else str(raw)
    return GpuIdentity(name=name.strip(), compute_capability=(int(prop.major), int(prop.minor)))


# -- memory ----------------------------------------------------------------------------------


class DeviceBuffer:
    """``nbytes`` of device memory on the current device."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr: int = int(check(runtime().cudaMalloc(self.nbytes)))

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            check(runtime().cudaFree(ptr))


class PinnedBuffer:
    """``nbytes`` of page-locked host memory, with numpy views over it."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr: int = int(check(runtime().cudaMallocHost(self.nbytes)))
        self._bytes: Array = np.ctypeslib.as_array(
            (ctypes.c_ubyte * self.nbytes).from_address(self.ptr))

    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> Array:
        count = 1
        for d in shape:
            count *= d
        return self._bytes[:count * dtype.itemsize].view(dtype).reshape(shape)

    def free(self) -> None:
        if self.ptr:
            ptr, self.ptr = self.ptr, 0
            self._bytes = np.empty(0, dtype=np.uint8)
            check(runtime().cudaFreeHost(ptr))


#: The page-locked blocks pinned_allocator made and not yet freed: start -> end, and the
#: starts in order (several instances' threads allocate and look up at once).
_PINNED: dict[int, int] = {}
_PINNED_STARTS: list[int] = []
_PINNED_LOCK = threading.Lock()


def pinned_allocator(nbytes: int) -> Array:
    """A packing-pool Allocator (server.packing.pool) of page-locked memory: the memory is
    freed when the last numpy view of it is gone. A GPU backend's versions get their batch
    buffers from it (Backend.host_allocator), so their batches copy to the device without
    staging."""
    cudart = runtime()
    nbytes = max(1, nbytes)
    ptr = int(check(cudart.cudaMallocHost(nbytes)))
    with _PINNED_LOCK:
        bisect.insort(_PINNED_STARTS, ptr)
        _PINNED[ptr] = ptr + nbytes
    holder = (ctypes.c_ubyte * nbytes).from_address(ptr)
    weakref.finalize(holder, _free_host, ptr)
    array: Array = np.ctypeslib.as_array(holder)
    return array


def _free_host(ptr: int) -> None:
    with _PINNED_LOCK:
        if _PINNED.pop(ptr, None) is not None:
            del _PINNED_STARTS[bisect.bisect_left(_PINNED_STARTS, ptr)]
    with contextlib.suppress(Exception):  # interpreter shutdown: the process is going anyway
        runtime().cudaFreeHost(ptr)


def is_pinned(array: Array) -> bool:
    """True when ``array`` lies in a block pinned_allocator made (a GPU version's batch
    buffers): a lookup, no CUDA call per batch. Memory page-locked some other way is staged
    like pageable memory: correct, one copy more."""
    start = int(array.ctypes.data)
    with _PINNED_LOCK:
        index = bisect.bisect_right(_PINNED_STARTS, start) - 1
        return index >= 0 and start + array.nbytes <= _PINNED[_PINNED_STARTS[index]]


# -- streams and graphs ----------------------------------------------------------------------


def _address(handle: Any) -> int:
    """The integer value of a cuda-python handle (cudaStream_t and friends)."""
    try:
        return int(handle)
    except TypeError:
        return int(handle.getPtr())


class Stream:
    """A non-blocking CUDA stream (never synchronises with the legacy default stream)."""

    def __init__(self) -> None:
        cudart = runtime()
        non_blocking = getattr(cudart, "cudaStreamNonBlocking", 1)
        self.handle: Any = check(cudart.cudaStreamCreateWithFlags(non_blocking))
        #: The raw cudaStream_t, as TensorRT's execute_async_v3 takes it.
        self.ptr: int = _address(self.handle)

    def copy_to_device(self, dst: int, src: int, nbytes: int) -> None:
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, self.handle))

    def copy_to_host(self, dst: int, src: int, nbytes: int) -> None:
        cudart = runtime()
        check(cudart.cudaMemcpyAsync(dst, src, nbytes,
                                     cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, self.handle))

    def synchronize(self) -> None:
        check(runtime().cudaStreamSynchronize(self.handle))

    def destroy(self) -> None:
        if self.handle is not None:
            handle, self.handle = self.handle, None
            check(runtime().cudaStreamDestroy(handle))


class Graph:
    """One captured CUDA graph, launched on the stream it was captured on."""

    def __init__(self, exec_handle: Any, graph: Any) -> None:
        self._exec = exec_handle
        self._graph = graph

    @classmethod
    def capture(cls, stream: Stream, work: Callable[[], bool]) -> Graph | None:
        """Record ``work`` (which enqueues on ``stream``); None when it cannot be captured.

        Thread-local capture mode: other threads (other model instances) keep allocating and
        copying while this one records.
        """
        cudart = runtime()
        mode = cudart.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(cudart.cudaStreamBeginCapture(stream.handle, mode))
        try:
            ok = bool(work())
        except Exception:  # TensorRT refused to enqueue under capture
            ok = False
        result = cudart.cudaStreamEndCapture(stream.handle)
        if _code(result[0]) != 0 or not ok:
            cudart.cudaGetLastError()
            if _code(result[0]) == 0 and result[1] is not None:
                cudart.cudaGraphDestroy(result[1])
            return None
        graph = result[1]
        instantiated = cudart.cudaGraphInstantiate(graph, 0)
        if _code(instantiated[0]) != 0:
            cudart.cudaGetLastError()
            cudart.cudaGraphDestroy(graph)
            return None
        return cls(instantiated[1], graph)

    def launch(self, stream: Stream) -> None:
        check(runtime().cudaGraphLaunch(self._exec, stream.handle))

    def destroy(self) -> None:
        cudart = runtime()
        if self._exec is not None:
            cudart.cudaGraphExecDestroy(self._exec)
            self._exec = None
        if self._graph is not None:
            cudart.cudaGraphDestroy(self._graph)
            self._graph = None
