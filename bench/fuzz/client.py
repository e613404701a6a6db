"""One fuzz case sent over raw gRPC, and the verdict on what came back.

Unary cases go to ModelInfer through a generic method (identity serializers: the bytes are
sent as they are, malformed ones too); stream cases to ModelStreamInfer, where each request's
failure comes back in-band as ``error_message`` "[CODE] text" (frontend/inference.py). A
proper answer is a status a client can act on; UNKNOWN (an exception escaped the handler),
CANCELLED or another code is a failure, and so is an INTERNAL status unless its message is the
server's generic one ending in a correlation id (an unexpected server error answered cleanly:
flagged, for someone to look at). A call still unanswered after the per-call timeout is a hang.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
from google.protobuf.message import DecodeError

from bench.fuzz.strategies import UNARY, Case
from server._pb import grpc_service_pb2 as pb

SERVICE = "/inference.GRPCInferenceService/"
#: Every status a request may be refused with.
PROPER = frozenset({"OK", "INVALID_ARGUMENT", "NOT_FOUND", "UNAVAILABLE", "RESOURCE_EXHAUSTED",
                    "FAILED_PRECONDITION", "UNIMPLEMENTED", "DEADLINE_EXCEEDED"})
#: How the server words an INTERNAL answer (server/frontend/status.py, and a failed batch run):
#: no detail, only the id of the log line that has it.
GENERIC_INTERNAL = re.compile(r"\(correlation id [0-9a-f]+\)$")
_IN_BAND = re.compile(r"^\[([A-Z_]+)\] (.*)$", re.S)

OK, FLAGGED, FAILED, HANG = "ok", "flagged", "failed", "hang"


@dataclass(frozen=True)
class Answer:
    """One request's answer: its status code name and message."""

    code: str
    message: str


@dataclass(frozen=True)
class Outcome:
    """A call's answers (one per request sent), how long it took, and the verdict:
    ``ok``, ``flagged`` (a generic INTERNAL), ``failed`` (``problem`` says why) or ``hang``."""

    answers: tuple[Answer, ...]
    seconds: float
    verdict: str
    problem: str = ""


class FuzzClient:
    """Sends cases on one channel; ``timeout`` is the longest a call may take."""

    def __init__(self, channel: grpc.Channel, timeout: float) -> None:
        self.timeout = timeout
        self._unary = channel.unary_unary(SERVICE + "ModelInfer")
        self._stream = channel.stream_stream(SERVICE + "ModelStreamInfer")

    def send(self, case: Case) -> Outcome:
        started = time.monotonic()
        if case.rpc == UNARY:
            answers, problem = self._send_unary(case)
        else:
            answers, problem = self._send_stream(case)
        return judge(answers, time.monotonic() - started, self.timeout, problem)

    def _send_unary(self, case: Case) -> tuple[list[Answer], str]:
        future = self._unary.future(case.messages[0],
                                    timeout=self.timeout if case.deadline else None)
        try:
            data = future.result(timeout=self.timeout + 1.0)
        except grpc.FutureTimeoutError:
            future.cancel()
            return [Answer("DEADLINE_EXCEEDED", "no answer (client gave up)")], ""
        except grpc.RpcError as error:
            return [Answer(error.code().name, error.details() or "")], ""
        try:
            pb.ModelInferResponse.FromString(data)
        except DecodeError as exc:
            return [Answer("OK", "")], f"the answer is not a ModelInferResponse: {exc}"
        return [Answer("OK", "")], ""

    def _send_stream(self, case: Case) -> tuple[list[Answer], str]:
        def requests() -> Iterator[bytes]:
            yield from case.messages

        call = self._stream(requests(), timeout=self.timeout)
        answers: list[Answer] = []
        try:
            for data in call:
                try:
                    message = pb.ModelStreamInferResponse.FromString(data)
                except DecodeError as exc:
                    return answers, f"a stream answer is not a ModelStreamInferResponse: {exc}"
                answers.append(in_band(message.error_message))
        except grpc.RpcError as error:
            return [*answers, Answer(error.code().name, error.details() or "")], ""
        if len(answers) != len(case.messages):
            return answers, f"{len(case.messages)} requests on the stream, {len(answers)} answers"
        return answers, ""


def in_band(error_message: str) -> Answer:
    """A stream answer's status: OK without an error message, else the code it names."""
    if not error_message:
        return Answer("OK", "")
    match = _IN_BAND.match(error_message)
    if match is None:
        return Answer("UNKNOWN", error_message)
    return Answer(match.group(1), match.group(2))


def judge(answers: list[Answer], seconds: float, timeout: float, problem: str = "") -> Outcome:
    final = tuple(answers)
    if seconds >= timeout:
        return Outcome(final, seconds, HANG, f"no answer within {timeout:g} s")
    if problem:
        return Outcome(final, seconds, FAILED, problem)
    flagged = False
    for answer in answers:
        if answer.code == "INTERNAL" and GENERIC_INTERNAL.search(answer.message):
            flagged = True
        elif answer.code not in PROPER:
            return Outcome(final, seconds, FAILED,
                           f"improper status {answer.code}: {answer.message[:200]}")
    return Outcome(final, seconds, FLAGGED if flagged else OK)
