"""``trt_cuda_graphs`` on an ONNX model, through a real server: ONNX Runtime's TensorRT
provider replays one captured graph over the addresses it was captured with, so the model's
IO is bound to buffers allocated once (server/backends/fixed_binding.py) and only a model
whose every run has one shape loads. Checked here on the CPU, where the same fixed binding
serves (the graph itself needs a GPU and TensorRT: tests/gpu)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests import model_factory
from tests.server_harness import ServerThread

GRAPHS = {"execution_accelerator": "tensorrt", "trt_cuda_graphs": "true"}


def with_parameters(model_dir: Path, parameters: dict[str, str]) -> None:
    config = (model_dir / "config.pbtxt").read_text()
    for key, value in parameters.items():
        config += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    model_factory.write_config(model_dir, config)


def test_fixed_shapes_run_on_buffers_bound_once_and_varying_ones_are_refused(
    tmp_path: Path,
) -> None:
    with_parameters(model_factory.no_batch_model(tmp_path, "fixed"), GRAPHS)
    with_parameters(model_factory.add_sub_model(tmp_path, "batching"), GRAPHS)
    with ServerThread(tmp_path, strict_readiness=False) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        for step in range(5):  # new data each run, copied into the same buffer
            x = np.random.default_rng(step).standard_normal(4).astype(np.float32)
            data = grpcclient.InferInput("INPUT0", [4], "FP32")
            data.set_data_from_numpy(x)
            out = client.infer("fixed", [data]).as_numpy("OUTPUT0")
            np.testing.assert_array_equal(out, x * 2)
        states = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models}
        state, reason = states["batching"]
        assert state == "UNAVAILABLE"
        assert "'trt_cuda_graphs'" in reason and "max_batch_size is 8" in reason, reason
