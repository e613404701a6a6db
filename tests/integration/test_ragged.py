"""Ragged batching through a real server and tritonclient: requests whose variable dims differ
share one padded batch, and each gets its own answer back at its own length."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient

from tests import model_factory
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(30)

#: A fixed (Triton-style) queue delay: the three concurrent requests always meet in one batch.
DELAY_US = 2_000_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("ragged_repo")
    model_factory.ragged_model(repo, "ragged", max_queue_delay_microseconds=DELAY_US,
                               preferred_batch_size=[3], queue_delay="fixed")
    model_factory.ragged_model(repo, "ragged_padded", pad=-1.0,
                               max_queue_delay_microseconds=DELAY_US, preferred_batch_size=[2],
                               queue_delay="fixed")
    with ServerThread(repo) as running:
        yield running


def inputs(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("X", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def batch_sizes(server: ServerThread, model: str) -> list[int]:
    with grpcclient.InferenceServerClient(server.url) as client:
        (stats,) = client.get_inference_statistics(model, "1").model_stats
    return sorted(b.batch_size for b in stats.batch_stats)


async def test_different_lengths_share_one_batch_and_come_back_unpadded(
    aio: aioclient.InferenceServerClient, server: ServerThread
) -> None:
    rng = np.random.default_rng(3)
    xs = [rng.standard_normal((1, n)).astype(np.float32) for n in (2, 7, 4)]
    results = await asyncio.gather(*(aio.infer("ragged", inputs(x)) for x in xs))
    for x, result in zip(xs, results, strict=True):
        doubled = result.as_numpy("DOUBLED")
        assert doubled.shape == x.shape  # cut back from the batch's 7 to this request's length
        np.testing.assert_array_equal(doubled, 2 * x)
        # Zero padding leaves the per-row sum as it would be alone.
        np.testing.assert_allclose(result.as_numpy("TOTAL"), x.sum(axis=1, keepdims=True),
                                   rtol=1e-6)
    assert batch_sizes(server, "ragged") == [3]  # one execution for all three lengths


async def test_configured_pad_value_fills_the_batch(
    aio: aioclient.InferenceServerClient, server: ServerThread
) -> None:
    short = np.ones((1, 2), dtype=np.float32)
    long = np.ones((1, 5), dtype=np.float32)
    results = await asyncio.gather(aio.infer("ragged_padded", inputs(short)),
                                   aio.infer("ragged_padded", inputs(long)))
    assert batch_sizes(server, "ragged_padded") == [2]
    np.testing.assert_array_equal(results[0].as_numpy("DOUBLED"), 2 * short)
    # The short row was padded with three -1s: the model's sum sees them (what ragged_pad
    # is for: a value the model knows to ignore).
    np.testing.assert_allclose(results[0].as_numpy("TOTAL"), [[2.0 - 3.0]])
    np.testing.assert_allclose(results[1].as_numpy("TOTAL"), [[5.0]])
