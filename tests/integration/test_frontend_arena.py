"""Large messages through the arenas between the frontends and the engine (--frontends N,
server/multiproc/arena.py): requests and answers cross in them, not over the sockets;
answered whole and unmixed, unary and streamed; each block freed once its request is
answered, so an arena far smaller than the traffic through it never fills; a unary request it
cannot hold refused RESOURCE_EXHAUSTED, a streamed one sent over the socket instead; and none
when the compiled path is off."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from server._pb import grpc_service_pb2 as pb
from server.metrics.frontends import STATS_INTERVAL_S
from server.multiproc.arena import ARENA_MIN_BYTES
from server.packing import native_enabled
from tests import model_factory
from tests.integration.test_frontends import frontend_samples, frontends_of
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(180)
#: For the tests that look for the arenas: the native-code-off rerun has none.
needs_arenas = pytest.mark.skipif(
    not native_enabled(), reason="PEREGRINE_NATIVE=0: no arenas (the last test covers that)")

MIB = 1 << 20
ARENA = 4 * MIB
INFER = "/inference.GRPCInferenceService/ModelInfer"
STREAM = "/inference.GRPCInferenceService/ModelStreamInfer"
#: Answers as large as the requests (the client's default stops at 4 MiB).
CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 * MIB)]


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("arena_repo")
    model_factory.identity_model(root, "identity_fp32", "FP32")
    return root


@pytest.fixture(scope="module")
def served(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo, frontends=2, frontend_arena_bytes=ARENA) as server:
        yield server


def request(value: float, nbytes: int, request_id: str = "") -> pb.ModelInferRequest:
    """An identity_fp32 request of ``nbytes`` of input, every element ``value``."""
    message = pb.ModelInferRequest(model_name="identity_fp32", id=request_id)
    message.inputs.add(name="INPUT0", datatype="FP32", shape=[1, nbytes // 4])
    message.raw_input_contents.append(np.full(nbytes // 4, value, np.float32).tobytes())
    return message


def infer(url: str, value: float, nbytes: int) -> pb.ModelInferResponse:
    with grpc.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        call = channel.unary_unary(INFER, request_serializer=pb.ModelInferRequest.SerializeToString,
                                   response_deserializer=pb.ModelInferResponse.FromString)
        answer: pb.ModelInferResponse = call(request(value, nbytes), timeout=60)
    return answer


def assert_echo(raw: bytes, value: float, nbytes: int) -> None:
    np.testing.assert_array_equal(np.frombuffer(raw, np.float32),
                                  np.full(nbytes // 4, value, np.float32))


def arena_pages(purpose: str) -> dict[str, int]:
    """Bytes in use (allocated pages) of each ``purpose`` arena this process maps (the
    engine maps the frontends' request arenas and its own answer arenas), by mapping."""
    with open("/proc/self/maps", encoding="utf-8") as maps:
        ranges = [line.split()[0] for line in maps
                  if f"memfd:peregrine-{purpose}-arena " in line]
    return {r: os.stat(f"/proc/self/map_files/{r}").st_blocks * 512 for r in ranges}


@needs_arenas
def test_large_messages_cross_in_the_arenas_both_ways(repo: Path) -> None:
    before = {purpose: set(arena_pages(purpose)) for purpose in ("request", "answer")}
    with ServerThread(repo, frontends=2, frontend_arena_bytes=ARENA) as server:
        new = {purpose: {r: n for r, n in arena_pages(purpose).items()
                         if r not in before[purpose]} for purpose in ("request", "answer")}
        assert len(new["request"]) == len(new["answer"]) == 2  # one each per frontend
        assert sum(new["request"].values()) == sum(new["answer"].values()) == 0
        assert_echo(infer(server.url, 5.0, 4096).raw_output_contents[0], 5.0, 4096)
        assert sum(arena_pages("request")[r] for r in new["request"]) == 0  # too small
        assert_echo(infer(server.url, 6.0, MIB).raw_output_contents[0], 6.0, MIB)
        for purpose in ("request", "answer"):
            assert sum(arena_pages(purpose)[r] for r in new[purpose]) >= MIB


def test_far_more_than_the_arena_holds_passes_through_it_one_block_at_a_time(
        served: ServerThread) -> None:
    """40 MiB of requests through a 4 MiB arena: each block is free again once its request
    is answered, or the fourth request would find no room."""
    for i in range(40):
        answer = infer(served.url, i, MIB)
        assert_echo(answer.raw_output_contents[0], i, MIB)


def test_concurrent_large_requests_each_get_their_own_answer(served: ServerThread) -> None:
    def one(i: int) -> None:
        nbytes = ARENA_MIN_BYTES + 4096 * i
        with grpcclient.InferenceServerClient(served.url) as client:
            tensor = grpcclient.InferInput("INPUT0", [1, nbytes // 4], "FP32")
            tensor.set_data_from_numpy(np.full((1, nbytes // 4), i, np.float32))
            out = client.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0")
        assert out is not None
        assert_echo(out.tobytes(), i, nbytes)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(one, range(64)))


async def stream(url: str, messages: list[pb.ModelInferRequest]
                 ) -> dict[str, pb.ModelInferResponse]:
    async with grpc.aio.insecure_channel(url, options=CHANNEL_OPTIONS) as channel:
        call = channel.stream_stream(
            STREAM, request_serializer=pb.ModelInferRequest.SerializeToString,
            response_deserializer=pb.ModelStreamInferResponse.FromString)(iter(messages))
        answers = {}
        async for response in call:
            assert not response.error_message
            answers[response.infer_response.id] = response.infer_response
        return answers


def test_a_stream_of_large_requests_is_answered_whole(served: ServerThread) -> None:
    sizes = [ARENA_MIN_BYTES - 4, ARENA_MIN_BYTES, 256 * 1024, MIB]  # both sides of the cut
    messages = [request(i, sizes[i % 4], str(i)) for i in range(60)]
    answers = asyncio.run(stream(served.url, messages))
    assert sorted(answers, key=int) == [str(i) for i in range(60)]
    for i in range(60):
        assert_echo(answers[str(i)].raw_output_contents[0], i, sizes[i % 4])


@needs_arenas
def test_what_the_arena_cannot_hold_is_refused_unary_and_sent_over_the_socket_streamed(
        served: ServerThread) -> None:
    with pytest.raises(grpc.RpcError) as raised:
        infer(served.url, 1.0, 5 * MIB)
    assert raised.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "request arena (4194304 bytes, --frontend-arena-bytes)" in raised.value.details()
    answers = asyncio.run(stream(served.url, [request(2.0, 5 * MIB, "big")]))
    assert_echo(answers["big"].raw_output_contents[0], 2.0, 5 * MIB)


def test_the_arenas_figure_is_on_metrics_and_back_to_zero_once_answered(
        served: ServerThread) -> None:
    for i in range(4):
        infer(served.url, i, MIB)
    time.sleep(STATS_INTERVAL_S * 2.5)
    samples = frontend_samples(served)
    assert {label for name, label in samples if name == "peregrine_frontend_arena_bytes"} \
        == {"1", "2"}
    assert all(value == 0 for (name, _), value in samples.items()
               if name == "peregrine_frontend_arena_bytes")


def test_no_arena_when_the_compiled_path_is_off(repo: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PEREGRINE_NATIVE", "0")
    with ServerThread(repo, frontends=2, frontend_arena_bytes=ARENA) as server:
        assert frontends_of(server).arena_bytes == 0
        # Larger than the arena would hold: it goes over the socket, and is answered.
        answer = infer(server.url, 3.0, 5 * MIB)
        assert_echo(answer.raw_output_contents[0], 3.0, 5 * MIB)
