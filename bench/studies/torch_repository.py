"""Model repositories of the PyTorch backend for the GPU study (bench.studies.gpu_backends):
the example CNN (``cnn_torch``: examples/build_models.py --with-torch) and a ResNet-50-sized
network (the bottleneck layout of ResNet-50, random weights: 25.6 M parameters, 4.1 GFLOPs
per 224x224 image), each a torch.export program with a dynamic batch, served on GPU 0.

Nothing is downloaded: the networks are written here.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from bench.loadgen.environment import REPO_ROOT

#: Model name -> (input shape without the batch, classes).
SHAPES = {"cnn": ((3, 32, 32), 10), "resnet50": ((3, 224, 224), 1000)}
MAX_BATCH = 32


def config(name: str, cuda_graphs: bool) -> str:
    (channels, height, width), classes = SHAPES[name]
    return (
        f'name: "{name}"\nplatform: "pytorch_libtorch"\n'
        f'default_model_filename: "model.pt2"\nmax_batch_size: {MAX_BATCH}\n'
        f'input [ {{ name: "image" data_type: TYPE_FP32 dims: [ {channels}, {height}, '
        f"{width} ] }} ]\n"
        f'output [ {{ name: "scores" data_type: TYPE_FP32 dims: [ {classes} ] }} ]\n'
        "dynamic_batching { preferred_batch_size: [ 8, 16 ] max_queue_delay_microseconds: 200 }\n"
        "instance_group [ { count: 1 kind: KIND_GPU gpus: [ 0 ] } ]\n"
        f'parameters {{ key: "cuda_graphs" value {{ string_value: "{str(cuda_graphs).lower()}" '
        "} }\n"
    )


def program_path(repo: Path, name: str) -> Path:
    return repo / name / "1" / "model.pt2"


def make_repository(root: Path, name: str, cuda_graphs: bool) -> Path:
    """``root/<name>/...`` for the PyTorch backend on GPU 0."""
    target = program_path(root, name)
    target.parent.mkdir(parents=True, exist_ok=True)
    if name == "cnn":
        built = root / ".examples"
        subprocess.run([sys.executable, str(REPO_ROOT / "examples" / "build_models.py"),
                        "--out", str(built), "--with-torch"], check=True, cwd=REPO_ROOT,
                       capture_output=True)
        shutil.copyfile(program_path(built, "cnn_torch"), target)
    else:
        export_resnet50(target)
    (root / name / "config.pbtxt").write_text(config(name, cuda_graphs))
    return root


def export_resnet50(path: Path, width: int = 64) -> None:
    """A ResNet-50-shaped network (``width`` 64 is ResNet-50's) exported to ``path``."""
    import torch
    from torch import nn

    class Bottleneck(nn.Module):
        def __init__(self, inputs: int, planes: int, stride: int) -> None:
            super().__init__()
            outputs = planes * 4
            self.body = nn.Sequential(
                nn.Conv2d(inputs, planes, 1, bias=False), nn.BatchNorm2d(planes), nn.ReLU(),
                nn.Conv2d(planes, planes, 3, stride, 1, bias=False), nn.BatchNorm2d(planes),
                nn.ReLU(), nn.Conv2d(planes, outputs, 1, bias=False), nn.BatchNorm2d(outputs))
            self.skip: nn.Module = nn.Identity()
            if stride != 1 or inputs != outputs:
                self.skip = nn.Sequential(nn.Conv2d(inputs, outputs, 1, stride, bias=False),
                                          nn.BatchNorm2d(outputs))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.relu(self.body(x) + self.skip(x))

    layers: list[nn.Module] = [nn.Conv2d(3, width, 7, 2, 3, bias=False), nn.BatchNorm2d(width),
                               nn.ReLU(), nn.MaxPool2d(3, 2, 1)]
    inputs = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes = width * 2 ** stage
        for block in range(blocks):
            layers.append(Bottleneck(inputs, planes, 2 if block == 0 and stage else 1))
            inputs = planes * 4

    class ResNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(*layers)
            self.head = nn.Linear(inputs, SHAPES["resnet50"][1])

        def forward(self, image: torch.Tensor) -> torch.Tensor:
            pooled = self.features(image).mean(dim=(2, 3))
            return torch.softmax(self.head(pooled), dim=1)

    torch.manual_seed(0)
    batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)
    shape = SHAPES["resnet50"][0]
    program = torch.export.export(ResNet().eval(), (torch.zeros(2, *shape),),
                                  dynamic_shapes=({0: batch},))
    torch.export.save(program, str(path))


def plain_pytorch(repo: Path, name: str) -> Callable[[Mapping[str, Any]], Any]:
    """The program as PyTorch alone runs it on GPU 0 (the in-process ceiling): from the numpy
    inputs by name to the numpy result, copies both ways included."""
    import torch
    from torch.export.passes import move_to_device_pass

    from server.backends.pytorch.library import fp32_without_tf32

    fp32_without_tf32(torch)  # as the server's backend computes
    program = move_to_device_pass(torch.export.load(str(program_path(repo, name))), "cuda:0")
    module = program.module()

    def run(feeds: Mapping[str, Any]) -> Any:
        with torch.inference_mode():
            return module(torch.from_numpy(feeds["image"]).to("cuda:0")).cpu().numpy()

    return run
