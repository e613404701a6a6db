"""A model directory without config.pbtxt: auto-completed, and batching when it can."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tritonclient.grpc as grpcclient

from tests import model_factory
from tests.server_harness import ServerThread


def test_model_without_config_batches_when_every_first_dim_is_dynamic(tmp_path: Path) -> None:
    model_dir = model_factory.identity_model(tmp_path, "bare", "FP32", max_batch_size=8)
    (model_dir / "config.pbtxt").unlink()
    fixed = model_factory.no_batch_model(tmp_path, "fixed")
    (fixed / "config.pbtxt").unlink()
    with ServerThread(tmp_path) as running:
        client = grpcclient.InferenceServerClient(running.url)
        config = client.get_model_config("bare").config
        assert config.max_batch_size == 4
        assert config.HasField("dynamic_batching")
        assert list(config.input[0].dims) == [-1]
        metadata = client.get_model_metadata("bare")
        assert list(metadata.inputs[0].shape) == [-1, -1]
        x = np.arange(12, dtype=np.float32).reshape(4, 3)
        tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
        tensor.set_data_from_numpy(x)
        np.testing.assert_array_equal(client.infer("bare", [tensor]).as_numpy("OUTPUT0"), x)
        # A fixed first dimension is not a batch dimension: that model does not batch.
        assert client.get_model_config("fixed").config.max_batch_size == 0
