"""The fuzzer's verdicts (bench/fuzz/client.py) and what its strategies make
(bench/fuzz/strategies.py), without a server."""

from __future__ import annotations

import collections

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.fuzz.client import FAILED, FLAGGED, HANG, OK, Answer, in_band, judge
from bench.fuzz.strategies import (
    MUTATIONS,
    STREAM,
    UNARY,
    Case,
    Draft,
    cases,
    valid_draft,
)
from bench.fuzz.targets import Target, Tensor, valid_request
from server._pb import grpc_service_pb2 as pb
from server.codec.wire import NativeWireCodec

TARGETS = [
    Target("m", ("1", "2"), (Tensor("x", "FP32", (-1, 4)), Tensor("s", "BYTES", (-1, 1))),
           (Tensor("y", "FP32", (-1, 4)),), 8),
    Target("image", ("1",), (Tensor("image", "UINT8", (-1, -1, -1, 3)),),
           (Tensor("scores", "FP32", (-1, 10)),), 4),
    Target("flat", ("1",), (Tensor("b", "BOOL", (2, 3)),), (Tensor("o", "BOOL", (2, 3)),), 0),
]


@pytest.mark.parametrize(("answers", "seconds", "verdict"), [
    ([Answer("OK", "")], 0.1, OK),
    ([Answer("INVALID_ARGUMENT", "bad"), Answer("NOT_FOUND", "no")], 0.1, OK),
    ([Answer("DEADLINE_EXCEEDED", "expired")], 0.1, OK),
    ([Answer("INTERNAL", "internal error (correlation id 0123abcd0123abcd)")], 0.1, FLAGGED),
    ([Answer("INTERNAL", "Traceback (most recent call last): ...")], 0.1, FAILED),
    ([Answer("UNKNOWN", "Unexpected <class 'KeyError'>")], 0.1, FAILED),
    ([Answer("CANCELLED", "")], 0.1, FAILED),
    ([Answer("OK", "")], 10.0, HANG),
])
def test_judge(answers: list[Answer], seconds: float, verdict: str) -> None:
    assert judge(answers, seconds, 10.0).verdict == verdict


def test_a_problem_found_while_reading_fails_the_case() -> None:
    outcome = judge([Answer("OK", "")], 0.1, 10.0, "2 requests on the stream, 1 answers")
    assert (outcome.verdict, outcome.problem) == (FAILED, "2 requests on the stream, 1 answers")


def test_stream_errors_are_read_in_band() -> None:
    assert in_band("") == Answer("OK", "")
    assert in_band("[INVALID_ARGUMENT] input 'x'\nspans lines") == Answer(
        "INVALID_ARGUMENT", "input 'x'\nspans lines")
    assert in_band("no code") == Answer("UNKNOWN", "no code")


def test_valid_requests_decode() -> None:
    for target in TARGETS:
        request = NativeWireCodec().decode_request_bytes(valid_request(target), None, None)
        assert list(request.inputs) == [t.name for t in target.inputs]


def test_the_strategies_make_every_kind_of_case() -> None:
    seen: collections.Counter[str] = collections.Counter()

    @settings(max_examples=300, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(cases(TARGETS))
    def collect(case: Case) -> None:
        seen[case.rpc] += 1
        seen[case.kind] += 1
        seen.update(h.rpartition(":")[2] for h in case.how)
        if case.kind == "valid":
            pb.ModelInferRequest.FromString(case.messages[0])  # parses

    collect()
    expected = {UNARY, STREAM, "valid", "mutated", "corrupted", "random", *MUTATIONS,
                "flip", "truncate", "insert", "overwrite", "huge_length", "bad_utf8", "repeat"}
    assert expected <= set(seen), expected - set(seen)


@st.composite
def every_mutation(draw: st.DrawFn) -> Draft:
    draft = draw(valid_draft(TARGETS))
    for name in draw(st.permutations(sorted(MUTATIONS))):
        MUTATIONS[name](draw, draft)
    return draft


@settings(max_examples=100, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(every_mutation())
def test_the_mutations_apply_to_any_draft_in_any_order(draft: Draft) -> None:
    assert isinstance(draft.serialize(), bytes)
