"""The GPU dependency set is one CUDA major version: the `gpu` extra's packages (pyproject.toml)
and Dockerfile.gpu's base image, each read for the CUDA version it is built for; the image
puts the pip wheel's libnvinfer on the dynamic loader's path (ONNX Runtime's TensorRT provider
dlopens it by name); and the README's test command (which .ci/run runs) installs PyTorch's CPU
build, so CI never pulls CUDA wheels."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from tests.gpu.gpu_env import NVINFER_MAJOR

ROOT = Path(__file__).resolve().parents[2]
#: onnxruntime-gpu has no CUDA version in its name: the first release of the series built for
#: each CUDA major (1.31.1's wheel requires nvidia-cuda-runtime~=13.0).
ORT_GPU_SINCE = {13: Version("1.31")}
#: PyTorch's page of torch wheels, the +cpu builds among them.
TORCH_WHEELS = "https://download.pytorch.org/whl/torch/"


def _extra(name: str) -> dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return {r.name: r for r in map(Requirement, project["optional-dependencies"][name])}


def _majors(spec: SpecifierSet) -> set[int]:
    """The major versions ``spec`` allows, when it confines them to one (>=N..., <N+1)."""
    lows = [Version(s.version).major for s in spec if s.operator in (">=", "==", "~=")]
    highs = [Version(s.version) for s in spec if s.operator == "<"]
    assert lows and highs, f"{spec} leaves the major version open"
    low, high = max(lows), min(highs)
    top = high.major - 1 if high.minor == high.micro == 0 else high.major
    return set(range(low, top + 1))


def _cuda_major(requirement: Requirement) -> int:
    """The CUDA major version a `gpu` extra requirement is built for."""
    name, spec = requirement.name, requirement.specifier
    if match := re.fullmatch(r"(?:tensorrt|cupy|nvidia-.+)-cu(?:da)?(\d+)x?", name):
        return int(match.group(1))
    if name in ("cuda-python", "cuda-bindings"):  # versioned as the CUDA release they bind
        [major] = _majors(spec)
        return major
    if name == "onnxruntime-gpu":
        low = max(Version(s.version) for s in spec if s.operator == ">=")
        majors = [cuda for cuda, since in ORT_GPU_SINCE.items() if low >= since]
        assert majors, f"onnxruntime-gpu{spec} allows releases built for another CUDA"
        return max(majors)
    raise AssertionError(f"the gpu extra's {requirement} names no CUDA version (the plain "
                         "'tensorrt' metapackage picks one by itself): pin a -cuNN package")


def _image_cuda_major(dockerfile: str) -> int:
    [image] = re.findall(r"^ARG CUDA_RUNTIME_IMAGE=nvidia/cuda:(\d+)\.", dockerfile,
                         flags=re.MULTILINE)
    return int(image)


def test_the_gpu_extra_and_the_image_use_one_cuda_major_version() -> None:
    gpu = _extra("gpu")
    assert {"onnxruntime-gpu", "cuda-python"} <= set(gpu)
    assert any(name.startswith("tensorrt") for name in gpu)
    majors = {name: _cuda_major(requirement) for name, requirement in gpu.items()}
    image = _image_cuda_major((ROOT / "Dockerfile.gpu").read_text())
    assert set(majors.values()) == {image}, f"image CUDA {image}, the extra {majors}"


def test_tensorrt_is_the_major_version_the_backend_and_the_gpu_tests_expect() -> None:
    [trt] = [r for name, r in _extra("gpu").items() if name.startswith("tensorrt")]
    # 10: TensorRT 11 has no FP16/BF16/INT8 builder flags; the tests load libnvinfer.so.10.
    assert _majors(trt.specifier) == {NVINFER_MAJOR}


def test_the_image_installs_the_extra_and_puts_libnvinfer_on_the_loader_path() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text().replace("\\\n", " ")
    [install] = [line for line in text.splitlines() if "[gpu]" in line]
    # onnxruntime-gpu is reinstalled alone (onnxruntime shares its package): the same pin.
    pins = re.findall(r'"onnxruntime-gpu([^"]*)"', install)
    assert [SpecifierSet(p) for p in pins] == [_extra("gpu")["onnxruntime-gpu"].specifier]
    assert "--extra-index-url https://pypi.nvidia.com" in install  # tensorrt-cu13's libraries
    loader = re.search(r"find /opt/peregrine -name 'libnvinfer\.so\.\*' -printf '%h\\n'.*?"
                       r"> (/etc/ld\.so\.conf\.d/\S+\.conf)\s+&& test -s \1\s+&& ldconfig",
                       install)
    assert loader, "the image does not put the directory of libnvinfer on the loader's path"
    assert re.search(r'^SHELL \["/bin/bash", "-o", "pipefail"', text, flags=re.MULTILINE)


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text()
    [command] = [line for line in readme.splitlines()
                 if line.startswith("python3 -m venv") and "pytest" in line]
    return command


def test_ci_installs_the_cpu_build_of_torch() -> None:
    command = _readme_test_command()
    [torch] = [Requirement(r) for r in re.findall(r"pip install -q '(torch[^']*)'", command)]
    [pin] = list(torch.specifier)
    assert pin.operator == "==" and Version(pin.version).local == "cpu", torch
    assert f"--find-links {TORCH_WHEELS}" in command
    # Not in the test extra: the page is then asked about torch's packages only.
    assert "torch" not in _extra("test")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert command in ci, ".ci/run no longer runs the README's test command"
