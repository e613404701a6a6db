"""The CUDA layer (server/backends/tensorrt/cuda.py) without a GPU: it takes cuda-bindings 13
(``cuda.bindings.runtime``) or cuda-python 12 (``cuda.cudart``), and on a machine without a
driver or device says so through the real bindings (the test extra installs cuda-bindings 13:
its import needs no driver). The round trips and graph capture run on a GPU
(bench/gpu_check.sh)."""

from __future__ import annotations

import sys
from types import ModuleType

import pytest

from server.backends.tensorrt import cuda
from server.errors import ModelLoadError


@pytest.fixture
def fresh_runtime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cuda, "_runtime", None)


def _bindings_13() -> ModuleType | None:
    try:
        from cuda.bindings import runtime
    except ImportError:
        return None
    return runtime


@pytest.mark.skipif(_bindings_13() is None, reason="cuda-bindings is not installed")
def test_cuda_bindings_13_is_the_runtime_and_a_machine_without_a_gpu_says_so(
    fresh_runtime: None,
) -> None:
    assert cuda.runtime() is _bindings_13()
    count, why = cuda.device_count()
    if count:
        pytest.skip("a CUDA device is here: tests/gpu and bench/gpu_check.sh cover it")
    assert why.startswith("cudaError"), why  # InsufficientDriver, NoDevice...
    with pytest.raises(ModelLoadError, match=f"no CUDA device: {why}"):
        cuda.require_device(0)


def test_cuda_python_12_is_taken_when_cuda_bindings_is_not_there(
    fresh_runtime: None, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """cuda-python 12 before 12.6 has only ``cuda.cudart`` (no ``cuda.bindings``)."""
    cudart = ModuleType("cuda.cudart")
    package = ModuleType("cuda")
    package.cudart = cudart  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "cuda", package)
    monkeypatch.setitem(sys.modules, "cuda.cudart", cudart)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    assert cuda.runtime() is cudart


def test_neither_is_a_clear_load_error(fresh_runtime: None,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(ModelLoadError, match=r"cuda-python is not installed.*'gpu' extra"):
        cuda.runtime()
