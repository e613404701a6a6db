"""A PyTorch model file as the backend runs it: a TorchScript module (``model.pt``, saved by
``torch.jit.save``) or a ``torch.export`` program (``model.pt2``, ``torch.export.save``), told
apart by the file's suffix, with the names of its forward arguments."""

from __future__ import annotations

import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.errors import ModelLoadError

#: The suffix of torch.export programs; any other file is loaded as TorchScript.
EXPORT_SUFFIX = ".pt2"
#: torch.export.load keeps its deserializer in a global (two loads at once fail with
#: "_CURRENT_DESERIALIZER is already set"): loads of all models, on every loader thread, take
#: turns.
_load_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class ArgSpec:
    """One forward argument: its name, and (torch.export only) the dtype and rank the program
    was exported with."""

    name: str
    has_default: bool = False
    dtype: Any = None
    rank: int | None = None


@dataclass(frozen=True, slots=True)
class Program:
    module: Any
    #: "torchscript" or "torch.export".
    kind: str
    args: tuple[ArgSpec, ...]


def load_program(torch: Any, path: Path, device: str) -> Program:
    """Load ``path`` onto ``device`` ("cpu", "cuda:0"). Raises ModelLoadError."""
    try:
        with _load_lock:
            if path.suffix == EXPORT_SUFFIX:
                return _exported(torch, path, device)
            return _scripted(torch, path, device)
    except ModelLoadError:
        raise
    except Exception as exc:  # torch raises many unrelated types for a bad file
        kind = "torch.export program" if path.suffix == EXPORT_SUFFIX else "TorchScript module"
        raise ModelLoadError(f"PyTorch could not load '{path}' as a {kind}: {exc}") from exc


def _scripted(torch: Any, path: Path, device: str) -> Program:
    with warnings.catch_warnings():
        # PyTorch 2.10+ deprecates TorchScript; Triton's model.pt is TorchScript.
        warnings.simplefilter("ignore", DeprecationWarning)
        module = torch.jit.load(str(path), map_location=device)
    module.eval()
    arguments = module.forward.schema.arguments[1:]  # [0] is self
    args = tuple(ArgSpec(a.name, has_default=a.default_value is not None) for a in arguments)
    return Program(module, "torchscript", args)


def _exported(torch: Any, path: Path, device: str) -> Program:
    from torch.export.graph_signature import InputKind

    program = torch.export.load(str(path))
    placeholders = {node.name: node for node in program.graph.nodes if node.op == "placeholder"}
    args = []
    for spec in program.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT:
            continue
        value = placeholders[spec.arg.name].meta.get("val")
        args.append(ArgSpec(spec.arg.name, dtype=getattr(value, "dtype", None),
                            rank=len(value.shape) if value is not None else None))
    if device != "cpu":
        # Parameters, buffers and the constants the graph holds (torch 2.5 and later).
        from torch.export.passes import move_to_device_pass

        program = move_to_device_pass(program, device)
    return Program(program.module(), "torch.export", tuple(args))
