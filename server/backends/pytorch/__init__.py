"""PyTorch backend, as Triton names it (``platform: "pytorch_libtorch"``, ``backend:
"pytorch"``): serves TorchScript modules (``model.pt``) and ``torch.export`` programs
(``model.pt2``: ``default_model_filename``), on the CPU or on CUDA (``instance_group`` kind
and gpus), batched by the server's batcher like every model.

torch comes with the `torch` extra and is imported only when a PyTorch model loads: without
it, loading fails with a clear ModelLoadError. The modules:

- factory.py: PyTorchFactory, what server/app.py registers: the instance's device, the
  config checked against the program, the warm-up on a GPU;
- runtime.py: PyTorchInstance (execution on the CPU, or on a GPU with the instance's stream,
  pinned staging and CUDA graphs per batch shape);
- binding.py: which config tensor is which forward argument and result (Triton's
  ``INPUT__0`` convention, or names);
- program.py: loading TorchScript and torch.export files;
- library.py: importing torch, its tensor types, the precision contract's TF32 switches.
"""

from server.backends.pytorch.factory import PyTorchFactory

__all__ = ["PyTorchFactory"]
