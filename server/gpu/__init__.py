"""GPU execution: config parameters, TensorRT engine-cache keys and a thin CUDA runtime layer.

Everything here imports without a GPU, TensorRT or cuda-python: ``options`` and
``engine_cache`` are pure (the repository validates parameters with them at load, and CPU
tests cover them); ``cuda`` imports cuda-python only when a backend first asks for it.
"""
