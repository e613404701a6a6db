"""Builders of small PyTorch models for the PyTorch backend's tests, made on the spot (never
downloaded), each written with its config.pbtxt in Triton's layout:

    scripted_mlp(repo)        # TorchScript model.pt: INPUT__0 [8], INPUT__1 [3] -> OUTPUT__0
                              #   [3] (softmax of a linear layer plus INPUT__1), OUTPUT__1 [8]
    exported_cnn(repo)        # torch.export model.pt2: "image" [3, 16, 16] -> dict
                              #   {"scores": [10], "features": [4]}, dynamic batch
    scripted_half(repo)       # TorchScript: "x" FP16 [4] and "y" BF16 [4] -> "x2" (x * 2,
                              #   FP16), "y1" (y + 1, BF16), named arguments, a tuple result

``module(name)`` gives the same network in process (the oracle the served answers are compared
with). Import only where torch is installed (the tests skip without it).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import nn


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(8, 3)

    def forward(self, features: torch.Tensor,
                bias: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.softmax(self.linear(features) + bias, dim=1), features * 2


class Cnn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 10)

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        features = torch.relu(self.conv(image)).mean(dim=(2, 3))
        return {"scores": torch.softmax(self.head(features), dim=1), "features": features}


class Half(nn.Module):
    def forward(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x * 2, y + 1


def module(name: str) -> nn.Module:
    """The network behind model ``name``, with its weights (seeded: the same every call)."""
    torch.manual_seed(0)
    network: nn.Module = {"mlp": Mlp, "cnn": Cnn, "half": Half}[name]()
    return network.eval()


def _config(name: str, which: str, max_batch_size: int, inputs: list[tuple[str, str, str]],
            outputs: list[tuple[str, str, str]], extra: str = "") -> str:
    """``which``: the lines that say which backend (platform, or backend and file name)."""
    def tensors(items: list[tuple[str, str, str]]) -> str:
        return ", ".join(f'{{ name: "{n}" data_type: {t} dims: [ {d} ] }}' for n, t, d in items)

    return (f'name: "{name}"\n{which}\nmax_batch_size: {max_batch_size}\n'
            f"input [ {tensors(inputs)} ]\noutput [ {tensors(outputs)} ]\n"
            "dynamic_batching { max_queue_delay_microseconds: 2000 }\n" + extra)


SCRIPTED = 'platform: "pytorch_libtorch"'


def _write(repo: Path, name: str, config: str, save: object, filename: str) -> Path:
    model_dir = repo / name
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit's, 2.10 and later
        save(model_dir / "1" / filename)  # type: ignore[operator]
    return model_dir


def scripted_mlp(repo: Path, name: str = "mlp", kind: str = "KIND_CPU", gpus: str = "") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module("mlp"))
    config = _config(name, SCRIPTED, 16,
                     [("INPUT__0", "TYPE_FP32", "8"), ("INPUT__1", "TYPE_FP32", "3")],
                     [("OUTPUT__0", "TYPE_FP32", "3"), ("OUTPUT__1", "TYPE_FP32", "8")],
                     f"instance_group [ {{ kind: {kind} {gpus} }} ]\n")
    return _write(repo, name, config, lambda path: torch.jit.save(scripted, str(path)),
                  "model.pt")


def exported_cnn(repo: Path, name: str = "cnn", kind: str = "KIND_CPU", gpus: str = "",
                 parameters: dict[str, str] | None = None) -> Path:
    batch = torch.export.Dim("batch", min=1, max=32)
    program = torch.export.export(module("cnn"), (torch.zeros(2, 3, 16, 16),),
                                  dynamic_shapes=({0: batch},))
    extra = f"instance_group [ {{ kind: {kind} {gpus} }} ]\n" + "".join(
        f'parameters {{ key: "{k}" value {{ string_value: "{v}" }} }}\n'
        for k, v in (parameters or {}).items())
    config = _config(name, 'backend: "pytorch"\ndefault_model_filename: "model.pt2"', 32,
                     [("image", "TYPE_FP32", "3, 16, 16")],
                     [("scores", "TYPE_FP32", "10"), ("features", "TYPE_FP32", "4")], extra)
    return _write(repo, name, config, lambda path: torch.export.save(program, str(path)),
                  "model.pt2")


def scripted_half(repo: Path, name: str = "half") -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        scripted = torch.jit.script(module("half"))
    config = _config(name, SCRIPTED, 8,
                     [("x", "TYPE_FP16", "4"), ("y", "TYPE_BF16", "4")],
                     [("x2", "TYPE_FP16", "4"), ("y1", "TYPE_BF16", "4")],
                     "instance_group [ { kind: KIND_CPU } ]\n")
    return _write(repo, name, config, lambda path: torch.jit.save(scripted, str(path)),
                  "model.pt")
