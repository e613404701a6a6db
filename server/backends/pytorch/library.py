"""PyTorch itself: imported only when a PyTorch model loads (a clear ModelLoadError without
it), its tensor types in ours, and the precision contract's TF32 switches."""

from __future__ import annotations

from typing import Any

from server.errors import ModelLoadError
from server.types import DataType

#: Our types -> torch's, by attribute name. BF16 travels as raw uint16 words, as everywhere
#: here: viewed as torch.bfloat16 on the way in, back as uint16 on the way out. BYTES has no
#: tensor type in PyTorch.
TORCH_TYPES: dict[DataType, str] = {
    DataType.BOOL: "bool",
    DataType.UINT8: "uint8",
    DataType.UINT16: "uint16",
    DataType.UINT32: "uint32",
    DataType.UINT64: "uint64",
    DataType.INT8: "int8",
    DataType.INT16: "int16",
    DataType.INT32: "int32",
    DataType.INT64: "int64",
    DataType.FP16: "float16",
    DataType.FP32: "float32",
    DataType.FP64: "float64",
    DataType.BF16: "bfloat16",
}


def import_torch() -> Any:
    """The torch module; ModelLoadError when it is not installed."""
    try:
        import torch
    except ImportError as exc:
        raise ModelLoadError(
            "torch is not installed (it comes with the 'torch' extra: pip install "
            f"'peregrine[torch]'): {exc}"
        ) from None
    return torch


def torch_dtype(torch: Any, datatype: DataType, where: str) -> Any:
    """torch's dtype for ``datatype``; ModelLoadError for a type PyTorch has no tensor of."""
    name = TORCH_TYPES.get(datatype)
    dtype = getattr(torch, name, None) if name else None
    if dtype is None:
        raise ModelLoadError(
            f"{where} is {datatype.config_name}, which PyTorch has no tensor type for; "
            f"supported: {sorted(t.config_name for t in TORCH_TYPES)}"
        )
    return dtype


def fp32_without_tf32(torch: Any) -> None:
    """The precision contract (server/accelerator_options.py): FP32 products and convolutions
    in IEEE FP32, not TF32 (cuDNN allows TF32 by default). Process-wide in PyTorch: every
    PyTorch model of this server computes FP32 as FP32. PyTorch 2.9 and later take the
    ``fp32_precision`` settings (and refuse a mix with the older ``allow_tf32`` flags)."""
    backends = torch.backends
    conv = getattr(backends.cudnn, "conv", None)
    if conv is not None and hasattr(conv, "fp32_precision"):
        backends.cuda.matmul.fp32_precision = "ieee"
        conv.fp32_precision = "ieee"
        backends.cudnn.rnn.fp32_precision = "ieee"
        return
    backends.cuda.matmul.allow_tf32 = False
    backends.cudnn.allow_tf32 = False
