"""The TensorRT backend (server/backends/tensorrt/: factory.py, runtime.py, builder.py,
progress.py, library.py) without TensorRT or a GPU: clear load errors, type mapping, build
progress, engine/config checks, and the execution flow (shapes, staging, CUDA graphs per
shape) driven through fakes of the engine, the context and the CUDA layer (cuda.py).

The fakes keep "device" memory in host numpy buffers and run the copies with memmove, so the
byte flow is the real one; only TensorRT's kernels and CUDA's asynchrony are simulated. The
same paths run for real in tests/gpu/.
"""

from __future__ import annotations

import ctypes
import io
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from server.accelerator_options import TrtOptions
from server.backends.tensorrt import TensorRtFactory, cuda
from server.backends.tensorrt import factory as trt_factory
from server.backends.tensorrt.builder import EngineRecord
from server.backends.tensorrt.engine_cache import GpuIdentity
from server.backends.tensorrt.library import datatype_of
from server.backends.tensorrt.progress import BuildProgress
from server.backends.tensorrt.runtime import TensorRtInstance, check_engine_against_spec
from server.errors import InvalidInput, ModelLoadError
from server.interfaces import DeviceBackend
from server.spec import BatchingSpec, InstanceSpec, ModelSpec, TensorSpec
from server.types import DataType, InferRequest
from tests import model_factory

# -- load errors without TensorRT / CUDA -----------------------------------------------------


def trt_spec(**params: str) -> ModelSpec:
    return ModelSpec(
        name="t", platform="tensorrt_plan", backend="tensorrt", max_batch_size=8,
        inputs=(TensorSpec("x", DataType.FP32, (4,)),),
        outputs=(TensorSpec("y", DataType.FP32, (4,)),),
        batching=BatchingSpec(enabled=True),
        instances=(InstanceSpec("GPU", 1, (0,)),), parameters=params,
        default_model_filename="model.onnx" if params.get("trt_build_from_onnx") else
        "model.plan",
    )


def tensorrt_importable() -> bool:
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.mark.skipif(tensorrt_importable(), reason="tensorrt is installed here")
def test_loading_without_tensorrt_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="tensorrt is not installed") as raised:
        TensorRtFactory().load(trt_spec(), str(tmp_path), 0)
    assert "'gpu' extra" in str(raised.value)


class FakeCudart:
    """Just enough of cuda-python's runtime for device discovery."""

    def __init__(self, devices: int, error: int = 0) -> None:
        self.devices = devices
        self.error = error

    def cudaGetDeviceCount(self) -> tuple[int, int]:
        return (self.error, self.devices)

    def cudaGetErrorName(self, err: int) -> tuple[int, bytes]:
        return (0, {100: b"cudaErrorNoDevice", 35: b"cudaErrorInsufficientDriver"}[err])


@pytest.fixture
def fake_tensorrt(monkeypatch: pytest.MonkeyPatch) -> None:
    # The factory is where a load looks TensorRT up.
    monkeypatch.setattr(trt_factory, "import_tensorrt", lambda: SimpleNamespace())


def test_no_cuda_device_is_a_clear_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tensorrt: None
) -> None:
    monkeypatch.setattr(cuda, "_runtime", FakeCudart(0, error=100))
    with pytest.raises(ModelLoadError, match="no CUDA device: cudaErrorNoDevice"):
        TensorRtFactory().load(trt_spec(), str(tmp_path), 0)
    monkeypatch.setattr(cuda, "_runtime", FakeCudart(0, error=35))
    with pytest.raises(ModelLoadError, match="no CUDA device: cudaErrorInsufficientDriver"):
        TensorRtFactory().load(trt_spec(), str(tmp_path), 0)


def test_a_gpu_that_is_not_there_is_a_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tensorrt: None
) -> None:
    monkeypatch.setattr(cuda, "_runtime", FakeCudart(2))
    spec = trt_spec()
    spec = ModelSpec(**{**{f: getattr(spec, f) for f in (
        "name", "platform", "backend", "max_batch_size", "inputs", "outputs", "batching",
        "parameters", "default_model_filename")}, "instances": (InstanceSpec("GPU", 1, (3,)),)})
    with pytest.raises(ModelLoadError, match=r"CUDA device 3 does not exist; this machine has 2"):
        TensorRtFactory().load(spec, str(tmp_path), 0)


def test_missing_cuda_python_is_a_clear_load_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fake_tensorrt: None
) -> None:
    monkeypatch.setattr(cuda, "_runtime", None)
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(ModelLoadError, match="cuda-python is not installed"):
        TensorRtFactory().load(trt_spec(), str(tmp_path), 0)


def test_spec_of_an_onnx_build_is_completed_on_the_cpu(tmp_path: Path) -> None:
    model_factory.add_sub_model(tmp_path, "add_sub")
    bare = ModelSpec(name="add_sub", platform="tensorrt_plan", backend="tensorrt",
                     max_batch_size=8, inputs=(), outputs=(),
                     parameters={"trt_build_from_onnx": "true"})
    completed = TensorRtFactory().complete_spec(bare, str(tmp_path / "add_sub" / "1"))
    assert [t.name for t in completed.inputs] == ["INPUT0", "INPUT1"]
    assert [t.dims for t in completed.outputs] == [(16,), (16,)]


def test_tensorrt_types_map_to_ours() -> None:
    assert datatype_of(SimpleNamespace(name="HALF")) is DataType.FP16
    assert datatype_of(SimpleNamespace(name="BF16")) is DataType.BF16
    assert datatype_of("DataType.FLOAT") is DataType.FP32
    with pytest.raises(ModelLoadError, match="FP8 is not supported"):
        datatype_of(SimpleNamespace(name="FP8"))


# -- build progress --------------------------------------------------------------------------


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_a_bar_on_a_terminal() -> None:
    out = Tty()
    progress = BuildProgress("cnn", out)
    progress.phase_start("Building engine", None, 4)
    progress.phase_start("Tactic selection", "Building engine", 10)
    assert progress.step_complete("Tactic selection", 4)
    assert progress.line() == "[" + "#" * 15 + "-" * 15 + "] Tactic selection 5/10"
    progress.phase_finish("Tactic selection")
    assert progress.line().endswith("Building engine 0/4")
    progress.phase_finish("Building engine")
    progress.finish()
    assert progress.line() == ""
    assert "cnn: [" in out.getvalue() and "\r" in out.getvalue()
    assert progress.events == 5


def test_progress_prints_phases_when_not_a_terminal() -> None:
    out = io.StringIO()
    progress = BuildProgress("cnn", out)
    progress.phase_start("Building engine", None, 3)
    progress.phase_start("inner", "Building engine", 3)
    progress.step_complete("inner", 0)
    assert out.getvalue() == "cnn: Building engine (3 steps)\n"


def test_progress_cancel_stops_the_build() -> None:
    progress = BuildProgress("cnn")
    progress.phase_start("p", None, 2)
    assert progress.step_complete("p", 0)
    progress.cancel()
    assert not progress.step_complete("p", 1)


# -- fakes of TensorRT and the CUDA layer ----------------------------------------------------

MEMORY: dict[int, np.ndarray[Any, Any]] = {}


def _alloc(nbytes: int) -> tuple[int, np.ndarray[Any, Any]]:
    array = np.zeros(max(1, nbytes), dtype=np.uint8)
    ptr = int(array.ctypes.data)
    MEMORY[ptr] = array
    return ptr, array


class FakeDeviceBuffer:
    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(1, nbytes)
        self.ptr, self._array = _alloc(nbytes)

    def free(self) -> None:
        MEMORY.pop(self.ptr, None)
        self.ptr = 0


class FakePinnedBuffer(FakeDeviceBuffer):
    def view(self, dtype: np.dtype[Any], shape: tuple[int, ...]) -> np.ndarray[Any, Any]:
        count = int(np.prod(shape))
        return self._array[:count * dtype.itemsize].view(dtype).reshape(shape)


class FakeStream:
    copies = 0

    def __init__(self) -> None:
        self.ptr = 7
        self.handle = 7

    def copy_to_device(self, dst: int, src: int, nbytes: int) -> None:
        FakeStream.copies += 1
        ctypes.memmove(dst, src, nbytes)

    copy_to_host = copy_to_device

    def synchronize(self) -> None:
        pass

    def destroy(self) -> None:
        pass


class FakeGraph:
    captures = 0
    launches = 0
    allow = True

    def __init__(self, work: Callable[[], bool]) -> None:
        self.work = work

    @classmethod
    def capture(cls, stream: FakeStream, work: Callable[[], bool]) -> FakeGraph | None:
        if not cls.allow:
            return None
        cls.captures += 1
        return cls(work)  # recorded, not run: as a real capture

    def launch(self, stream: FakeStream) -> None:
        FakeGraph.launches += 1
        self.work()

    def destroy(self) -> None:
        pass


class FakeEngine:
    """y = 2 * x + 1 over x [-1, 4] FP32, batch 1..8; ``z`` (BF16 words) = x's words' count."""

    num_io_tensors = 2
    device_memory_size_v2 = 1024

    def __init__(self) -> None:
        self.contexts: list[FakeContext] = []

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

    def create_execution_context(self, strategy: object = None) -> FakeContext:
        context = FakeContext(user_managed=strategy is not None)
        self.contexts.append(context)
        return context


class FakeContext:
    def __init__(self, user_managed: bool) -> None:
        self.user_managed = user_managed
        self.memory: int | None = None
        self.shape: tuple[int, ...] | None = None
        self.addresses: dict[str, int] = {}
        self.runs = 0

    def set_device_memory(self, ptr: int, size: int) -> None:
        self.memory = ptr

    def set_input_shape(self, name: str, shape: tuple[int, ...]) -> bool:
        if len(shape) != 2 or not 1 <= shape[0] <= 8 or shape[1] != 4:
            return False
        self.shape = tuple(shape)
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        assert self.shape is not None
        return self.shape

    def set_tensor_address(self, name: str, ptr: int) -> None:
        self.addresses[name] = ptr

    def execute_async_v3(self, stream: int) -> bool:
        assert stream == 7
        assert not self.user_managed or self.memory is not None
        assert self.shape is not None
        self.runs += 1
        count = self.shape[0] * 4
        x = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["x"]),
                          dtype=np.float32)
        y = np.frombuffer((ctypes.c_float * count).from_address(self.addresses["y"]),
                          dtype=np.float32)
        y[:] = 2 * x + 1
        return True


FAKE_TRT = SimpleNamespace(
    __version__="10.99", TensorIOMode=SimpleNamespace(INPUT="INPUT"),
    ExecutionContextAllocationStrategy=SimpleNamespace(USER_MANAGED="USER_MANAGED"),
)
GPU = GpuIdentity("Fake GPU", (9, 0))


@pytest.fixture
def fake_cuda(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(cuda, "DeviceBuffer", FakeDeviceBuffer)
    monkeypatch.setattr(cuda, "PinnedBuffer", FakePinnedBuffer)
    monkeypatch.setattr(cuda, "Stream", FakeStream)
    monkeypatch.setattr(cuda, "Graph", FakeGraph)
    monkeypatch.setattr(cuda, "set_device", lambda device: None)
    monkeypatch.setattr(cuda, "is_pinned", lambda array: False)
    FakeGraph.captures = FakeGraph.launches = 0
    FakeGraph.allow = True
    yield
    MEMORY.clear()


def instance(graphs: bool) -> tuple[TensorRtInstance, FakeEngine]:
    engine = FakeEngine()
    options = TrtOptions(cuda_graphs=graphs, precision=("fp16",))
    record = EngineRecord(b"", "built", Path("x.plan"))
    return TensorRtInstance(FAKE_TRT, object(), engine, trt_spec(), 0, options, GPU,
                            record), engine


def batch(rows: int, seed: int) -> np.ndarray[Any, Any]:
    return np.random.default_rng(seed).standard_normal((rows, 4)).astype(np.float32)


@pytest.mark.parametrize("graphs", [False, True])
def test_batches_of_varying_size_give_the_right_outputs(fake_cuda: None, graphs: bool) -> None:
    inst, engine = instance(graphs)
    for step, rows in enumerate([1, 3, 8, 3, 1, 8, 5, 3]):
        x = batch(rows, step)
        out = inst.execute({"x": x})
        np.testing.assert_array_equal(out["y"], 2 * x + 1)
        assert out["y"].shape == (rows, 4) and out["y"].flags.owndata
    assert "tensorrt 10.99 (fp16" in inst.description and "Fake GPU sm90" in inst.description
    if graphs:
        assert "cuda graphs" in inst.description
        assert FakeGraph.captures == 4  # one per shape: 1, 3, 8, 5
        assert FakeGraph.launches == 4  # the repeats of 3, 1, 8, 3
        # Each graph has its own context fixed to its shape, sharing the scratch memory.
        assert len(engine.contexts) == 5
        assert len({c.memory for c in engine.contexts}) == 1
        assert sorted(c.shape[0] for c in engine.contexts[1:]) == [1, 3, 5, 8]  # type: ignore[index]
    else:
        assert FakeGraph.captures == 0 and len(engine.contexts) == 1
        assert engine.contexts[0].runs == 8
    inst.close()
    assert not MEMORY


def test_a_shape_that_cannot_be_captured_runs_without_a_graph(fake_cuda: None) -> None:
    FakeGraph.allow = False
    inst, engine = instance(graphs=True)
    for step in range(3):
        x = batch(2, step)
        np.testing.assert_array_equal(inst.execute({"x": x})["y"], 2 * x + 1)
    assert FakeGraph.launches == 0
    # One attempt (its own context ran the first batch), then the main context.
    assert engine.contexts[0].runs == 2 and engine.contexts[1].runs == 1


def test_inputs_outside_the_profile_are_refused(fake_cuda: None) -> None:
    inst, _ = instance(graphs=False)
    with pytest.raises(InvalidInput, match=r"has shape \[9, 4\]; the TensorRT engine takes "
                                           r"\[1, 4\] to \[8, 4\]"):
        inst.execute({"x": batch(9, 0)})
    with pytest.raises(InvalidInput, match="input 'x' is required"):
        inst.execute({})


def test_pinned_inputs_are_copied_without_staging(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cuda, "is_pinned", lambda array: True)
    inst, _ = instance(graphs=False)
    x = batch(4, 1)
    np.testing.assert_array_equal(inst.execute({"x": x})["y"], 2 * x + 1)


# -- engine against config -------------------------------------------------------------------


def test_engine_and_config_must_agree() -> None:
    engine = FakeEngine()
    check_engine_against_spec(FAKE_TRT, engine, trt_spec())
    wrong_type = ModelSpec(**{**_fields(trt_spec()),
                              "inputs": (TensorSpec("x", DataType.FP16, (4,)),)})
    with pytest.raises(ModelLoadError, match="'x' is TYPE_FP16 in the config but TYPE_FP32"):
        check_engine_against_spec(FAKE_TRT, engine, wrong_type)
    wrong_dims = ModelSpec(**{**_fields(trt_spec()),
                              "inputs": (TensorSpec("x", DataType.FP32, (5,)),)})
    with pytest.raises(ModelLoadError, match=r"config dims \[5\] do not match"):
        check_engine_against_spec(FAKE_TRT, engine, wrong_dims)
    too_big = ModelSpec(**{**_fields(trt_spec()), "max_batch_size": 16})
    with pytest.raises(ModelLoadError, match="takes batches of 1 to 8 rows"):
        check_engine_against_spec(FAKE_TRT, engine, too_big)
    renamed = ModelSpec(**{**_fields(trt_spec()),
                           "outputs": (TensorSpec("z", DataType.FP32, (4,)),)})
    with pytest.raises(ModelLoadError, match="output 'z' is not in the TensorRT engine"):
        check_engine_against_spec(FAKE_TRT, engine, renamed)


def _fields(spec: ModelSpec) -> dict[str, Any]:
    return {f: getattr(spec, f) for f in (
        "name", "platform", "backend", "max_batch_size", "inputs", "outputs", "batching",
        "instances", "parameters", "default_model_filename")}


# -- the pool's page-locked buffers ----------------------------------------------------------


class _HostOnlyRuntime:
    """cudaMallocHost/cudaFreeHost over plain memory: enough for the allocator's bookkeeping."""

    def __init__(self) -> None:
        self.blocks: dict[int, Any] = {}
        self.queries = 0

    def cudaMallocHost(self, nbytes: int) -> tuple[int, int]:
        block = (ctypes.c_ubyte * nbytes)()
        self.blocks[ctypes.addressof(block)] = block
        return 0, ctypes.addressof(block)

    def cudaFreeHost(self, ptr: int) -> tuple[int]:
        del self.blocks[ptr]
        return (0,)

    def cudaPointerGetAttributes(self, ptr: int) -> tuple[int, Any]:
        self.queries += 1
        raise AssertionError("is_pinned asks CUDA nothing")


def test_the_pools_pinned_buffers_are_known_without_asking_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = _HostOnlyRuntime()
    monkeypatch.setattr(cuda, "runtime", lambda: fake)
    monkeypatch.setattr(cuda, "check", lambda result: result[1])
    block = cuda.pinned_allocator(4096)
    assert cuda.is_pinned(block) and cuda.is_pinned(block[100:200])
    assert not cuda.is_pinned(np.ones(8))
    address = int(block.ctypes.data)
    del block
    import gc

    gc.collect()
    assert address not in fake.blocks  # freed with its last view
    assert not cuda._PINNED and not cuda._PINNED_STARTS


def test_a_tensorrt_versions_batches_come_from_page_locked_memory(
    fake_cuda: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batcher hands the packer the instance's allocator: the version's batch buffers are
    the instance's page-locked memory, so its inputs are copied to the device unstaged."""
    from server.packing.native import NativePacker

    made: list[int] = []

    def allocator(nbytes: int) -> np.ndarray[Any, Any]:
        made.append(nbytes)
        return np.zeros(nbytes, np.uint8)

    inst, _ = instance(graphs=False)
    assert isinstance(inst, DeviceBackend)  # what the batcher asks before choosing
    monkeypatch.setattr(inst, "host_allocator", allocator)
    packer = NativePacker().for_model(trt_spec(), "1", inst.host_allocator)
    x = batch(4, 3)
    requests = [InferRequest(model_name="m", model_version="1", id=str(i),
                             inputs={"x": x[2 * i:2 * i + 2]}, input_types={"x": DataType.FP32})
                for i in range(2)]  # two requests: gathered into a pooled buffer
    with packer.pack(requests, [2, 2]) as inputs:
        np.testing.assert_array_equal(inst.execute(dict(inputs))["y"], 2 * x + 1)
    assert made
