"""Whether this machine can run the GPU tests, and small helpers they share.

Every module in tests/gpu/ calls ``require_gpu()`` (and ``require_tensorrt()`` for TensorRT)
at import: without a GPU the whole module is skipped with the reason, before anything
GPU-specific is imported. CI and CPU-only machines therefore skip them cleanly.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[2]
CNN_ONNX = ROOT / "examples" / "models" / "cnn" / "1" / "model.onnx"
#: The TensorRT major version the `gpu` extra installs (tensorrt-cu13 10.x).
NVINFER_MAJOR = 10


def cnn_onnx() -> Path:
    """The example CNN, built by examples/build_models.py when a fresh clone lacks it."""
    if not CNN_ONNX.exists():
        subprocess.run([sys.executable, str(ROOT / "examples" / "build_models.py")],
                       check=True, capture_output=True, timeout=300, cwd=ROOT)
    return CNN_ONNX


def device_problem() -> str | None:
    """Why this machine has no usable NVIDIA GPU, or None when it has one."""
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return "no GPU: nvidia-smi is not installed"
    try:
        listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30,
                                check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"no GPU: nvidia-smi failed ({exc})"
    if listed.returncode != 0 or "GPU" not in listed.stdout:
        return f"no GPU: nvidia-smi -L says {listed.stdout.strip() or listed.stderr.strip()!r}"
    return None


def gpu_problem() -> str | None:
    """Why ONNX Runtime cannot run on a GPU here, or None when it can."""
    problem = device_problem()
    if problem is not None:
        return problem
    import onnxruntime as ort

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return ("onnxruntime has no CUDAExecutionProvider: install onnxruntime-gpu (the 'gpu' "
                "extra) in place of onnxruntime")
    return None


def ort_tensorrt_problem() -> str | None:
    """Why ONNX Runtime's TensorRT provider cannot start here: onnxruntime-gpu lists it
    whether or not TensorRT's libraries can be loaded, and then runs on CUDA instead."""
    problem = gpu_problem()
    if problem is not None:
        return problem
    import onnxruntime as ort

    if "TensorrtExecutionProvider" not in ort.get_available_providers():
        return "onnxruntime here has no TensorrtExecutionProvider"
    try:
        ctypes.CDLL(f"libnvinfer.so.{NVINFER_MAJOR}")
    except OSError as exc:
        return (f"TensorRT's libnvinfer.so.{NVINFER_MAJOR} cannot be loaded (install "
                "tensorrt-cu13 and put its tensorrt_libs directory on LD_LIBRARY_PATH, as "
                f"Dockerfile.gpu does): {exc}")
    return None


def tensorrt_problem() -> str | None:
    """Why the native TensorRT backend cannot run here (it needs no onnxruntime-gpu)."""
    problem = device_problem()
    if problem is not None:
        return problem
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"tensorrt is not installed (the 'gpu' extra): {exc}"
    try:
        from server.backends.tensorrt import cuda

        cuda.runtime()
    except Exception as exc:
        return str(exc)
    return None


def torch_cuda_problem() -> str | None:
    """Why the PyTorch backend cannot run on CUDA here (it needs neither onnxruntime-gpu nor
    TensorRT), or None when it can."""
    try:
        import torch
    except ImportError as exc:
        return f"torch is not installed (the 'torch' extra): {exc}"
    if not torch.cuda.is_available():
        return (f"torch {torch.__version__} sees no CUDA device (a CPU-only build, or no GPU "
                "here)")
    return None


def require_gpu() -> None:
    problem = gpu_problem()
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)


def require_tensorrt() -> None:
    problem = tensorrt_problem()
    if problem is not None:
        pytest.skip(problem, allow_module_level=True)


def images(rows: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((rows, 3, 32, 32)).astype(np.float32)


def gpu_config(name: str, *, platform: str, parameters: dict[str, str], max_batch_size: int = 32,
               preferred: tuple[int, ...] = (8, 16), count: int = 1, inputs: bool = True,
               delay_us: int = 200) -> str:
    """config.pbtxt of the CNN example (image FP32 [3,32,32] -> scores FP32 [10]) on GPU 0."""
    lines = [f'name: "{name}"', f'platform: "{platform}"', f"max_batch_size: {max_batch_size}"]
    if inputs:
        lines += ['input [ { name: "image" data_type: TYPE_FP32 dims: [ 3, 32, 32 ] } ]',
                  'output [ { name: "scores" data_type: TYPE_FP32 dims: [ 10 ] } ]']
    if preferred:
        sizes = ", ".join(str(s) for s in preferred)
        lines.append(f"dynamic_batching {{ preferred_batch_size: [ {sizes} ] "
                     f"max_queue_delay_microseconds: {delay_us} }}")
    else:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {delay_us} }}")
    lines.append(f"instance_group [ {{ count: {count} kind: KIND_GPU gpus: [ 0 ] }} ]")
    for key, value in parameters.items():
        lines.append(f'parameters {{ key: "{key}" value {{ string_value: "{value}" }} }}')
    return "\n".join(lines) + "\n"


def write_cnn(repo: Path, name: str, config: str, model: Path | None = None,
              filename: str = "model.onnx") -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(model or cnn_onnx(), model_dir / "1" / filename)
    (model_dir / "config.pbtxt").write_text(config)
    return model_dir


def cpu_reference(model: Path | None = None):  # type: ignore[no-untyped-def]
    """onnxruntime on the CPU: the oracle the GPU outputs are compared with (within
    FP32_ATOL, or TF32_ATOL where TF32 is allowed: server/accelerator_options.py)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(model or cnn_onnx()), providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"image": x})[0]
