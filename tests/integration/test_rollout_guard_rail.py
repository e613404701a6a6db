"""The rollout flow of ``peregrine optimize --rollout`` (server/cli/rollout.py) stopped by a
canary guard rail on a real server: a candidate that fails server-side on half the traffic
agrees with the source where it answers (so the shadow passes), then breaks the error-rate
guard rail in the canary; the server rolls it back and the flow stops naming the guard rail,
with all unversioned traffic back on the source."""

from __future__ import annotations

import textwrap
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from server.app import open_model_offline
from server.cli.rollout import Plan, Replay, Rollout
from tests.python_models import python_model
from tests.server_harness import ServerThread

MODEL = "guarded"
CONFIG = """\
    max_batch_size: 8
    version_policy: { all { } }
    input [ { name: "INPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
    output [ { name: "OUTPUT0" data_type: TYPE_FP32 dims: [ 2 ] } ]
    dynamic_batching { }
    """
#: Version 1 doubles its input; version 2 too, but fails (INTERNAL: the server's fault, so
#: the canary judges it) every request whose first value is above 0.5.
SOURCE = """\
    import triton_python_backend_utils as pb_utils


    class TritonPythonModel:
        def execute(self, requests):
            responses = []
            for request in requests:
                x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
                if BREAKS and float(x.flat[0]) > 0.5:
                    responses.append(pb_utils.InferenceResponse(
                        error=pb_utils.TritonError("candidate fault")))
                    continue
                responses.append(pb_utils.InferenceResponse(
                    [pb_utils.Tensor("OUTPUT0", x * 2)]))
            return responses
    """


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("repo")
    python_model(root, MODEL, CONFIG, f"BREAKS = False\n{textwrap.dedent(SOURCE)}", version=1)
    python_model(root, MODEL, CONFIG, f"BREAKS = True\n{textwrap.dedent(SOURCE)}", version=2)
    return root


@pytest.fixture(scope="module")
def server(repo: Path) -> Iterator[ServerThread]:
    with ServerThread(repo) as running:
        yield running


def test_a_failing_candidate_is_rolled_back_by_the_error_rate_guard_rail(
        repo: Path, server: ServerThread) -> None:
    spec, _ = open_model_offline(repo, MODEL)
    rows = {"INPUT0": np.random.default_rng(2).random((64, 2), dtype=np.float32)}
    canary = admin.Canary(steps=[50, 100], step_interval_secs=0.2, min_requests=5,
                          max_error_rate_increase=0.05, max_p99_ratio=1000)
    plan = Plan(model=MODEL, source="1", candidate="2", comparisons=10, min_agreement=0.99,
                max_rel_error=None, canary=canary, timeout=60, poll_secs=0.05)
    said: list[str] = []
    with grpc.insecure_channel(server.url) as channel, Replay(channel, (), spec, rows):
        outcome = Rollout(channel, (), 30.0, said.append).run(plan)
        status = admin_grpc.PeregrineAdminStub(channel).GetRoute(
            admin.RouteRequest(model=MODEL))
        answer = pb_grpc.GRPCInferenceServiceStub(channel).ModelInfer(pb.ModelInferRequest(
            model_name=MODEL, inputs=[pb.ModelInferRequest.InferInputTensor(
                name="INPUT0", datatype="FP32", shape=[1, 2])],
            raw_input_contents=[np.array([[0.9, 0.9]], np.float32).tobytes()]))

    assert any(line.startswith("canary from version 1 to version 2") for line in said), said
    assert not outcome.ok
    assert outcome.reason.startswith("canary rolled back: candidate error rate"), outcome
    assert "exceeds baseline 0.000 + 0.050" in outcome.reason
    assert outcome.reason.endswith(
        f"the routing table sends all unversioned traffic of '{MODEL}' to version 1")
    assert status.canary_state == "rolled_back"
    assert {v.version: v.weight for v in status.table.variants} == {"1": 100, "2": 0}
    # A row the candidate fails is answered, by the source, without naming a version.
    assert answer.model_version == "1"
