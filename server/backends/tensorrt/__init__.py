"""Native TensorRT backend: serves ``model.plan`` engines, or builds (and caches) them from
``model.onnx`` when the config asks (``trt_build_from_onnx: "true"``).

TensorRT and cuda-python come with the `gpu` extra and are imported only when a TensorRT model
loads: without them, or without a CUDA device, loading fails with a clear ModelLoadError
(``tensorrt is not installed`` / ``no CUDA device``), never a silent fallback to the CPU.
Importing this package needs neither: library.py imports TensorRT on the first load and
cuda.py imports cuda-python on its first call.

Per instance: its own engine (deserialized once per instance, so no two execution contexts
ever share an optimisation profile), one execution context, one non-blocking CUDA stream,
device buffers and page-locked host staging buffers sized for the profile's largest shapes.
A batch is: inputs copied into the pinned staging buffers (skipped when the packer's buffer is
already pinned), async copies to the device, ``execute_async_v3`` (or the batch shape's CUDA
graph), async copies back, one stream synchronisation, and outputs copied out of the staging
buffers (the next batch reuses them).

The modules:

- factory.py: TensorRtFactory, what server/app.py registers (re-exported here): the checks
  every load starts with, the engine, deserialisation, the instance;
- runtime.py: TensorRtInstance (execution, CUDA graphs) and the engine-against-config checks;
- builder.py: building engines from ONNX into the engine cache;
- engine_cache.py: the cache's keys, layout, atomic writes and build lock (pure);
- progress.py: TensorRT's logger and build progress;
- library.py: importing TensorRT, and its tensor types;
- cuda.py: a thin layer over the CUDA runtime (cuda-python).

The config parameters are in server/accelerator_options.py (the repository checks them when
it reads config.pbtxt; ONNX Runtime's TensorRT provider shares some).
"""

from server.backends.tensorrt.factory import TensorRtFactory

__all__ = ["TensorRtFactory"]
