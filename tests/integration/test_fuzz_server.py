"""Fuzzing through a real server (the overload/faults issue): hypothesis-made
ModelInferRequests — valid ones, valid-looking ones with something wrong, corrupted and random
bytes (bench/fuzz/strategies.py), shared-memory parameters naming a registered region — sent
unary and on streams to a server of identity models of every datatype, add_sub and a model
that does not batch. Every call must end with a proper
status within its timeout, every valid request must succeed, and afterwards the server still
answers ServerLive and each model's valid request with the bytes it answered before.

A bounded, derandomized run (the same cases on every run); the by-hand run of the same
strategies, 100,000 cases against ``peregrine serve``, is ``python -m
bench.studies.fuzz_server`` (figures in bench/RESULTS.md, "Fuzzing").
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz.client import OK, FuzzClient
from bench.fuzz.region import registered_region
from bench.fuzz.strategies import cases
from bench.fuzz.targets import Target, discover, valid_request
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests.server_harness import ServerThread

EXAMPLES = 400
TIMEOUT_S = 10.0


@pytest.fixture(scope="module")
def channel(standard_repo: Path) -> Iterator[grpc.Channel]:
    """A server of its own (the fuzz run moves the statistics other tests read), with the
    shared-memory region the requests may name registered."""
    with ServerThread(standard_repo, strict_readiness=False, allow_client_shm=True) as running, \
            grpc.insecure_channel(running.url) as opened, registered_region(opened):
        yield opened


def answers(channel: grpc.Channel, targets: list[Target]) -> dict[str, bytes]:
    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    return {t.name: infer(valid_request(t), timeout=TIMEOUT_S) for t in targets}


def test_fuzzed_requests_get_proper_answers_in_time(channel: grpc.Channel) -> None:
    targets = discover(channel)
    assert {"add_sub", "identity_bytes", "identity_bf16", "no_batch"} <= {t.name
                                                                         for t in targets}
    before = answers(channel, targets)
    client = FuzzClient(channel, TIMEOUT_S)

    @settings(max_examples=EXAMPLES, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(st.data())
    def fuzz(data: st.DataObject) -> None:
        case = data.draw(cases(targets))
        outcome = client.send(case)
        assert outcome.verdict == OK, outcome
        if case.kind == "valid":
            assert [a.code for a in outcome.answers] == ["OK"], outcome

    fuzz()
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    assert stub.ServerLive(pb.ServerLiveRequest(), timeout=TIMEOUT_S).live
    assert answers(channel, targets) == before
