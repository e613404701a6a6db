"""Confinement through a real server (security issue, item 5): a model name that could be a
path answers INVALID_ARGUMENT on every RPC that names a model, with the same message whether
that path exists or not, and loads, writes and remembers nothing; paths in a config override
(the model file, warm-up data) stay inside the model's directory; an override's counts are
capped."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests import model_factory
from tests.server_harness import ServerThread

MODEL = "m"
WIDTH = model_factory.SCALED_WIDTH
#: Names that must never reach the file system, as the issue lists them.
BAD_NAMES = ["/tmp/x", "../x", "m/1/../../m", "..", "a\\b", "x\x00y", "x\ny", "n" * 1000]

Call = Callable[[grpc.Channel, str], object]


def _infer_request(name: str) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name=name)
    request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, WIDTH])
    request.raw_input_contents.append(np.ones(WIDTH, dtype=np.float32).tobytes())
    return request


def _stream(channel: grpc.Channel, name: str) -> object:
    """ModelStreamInfer answers an error on the stream: raise it as the unary RPCs do."""
    stub = pb_grpc.GRPCInferenceServiceStub(channel)
    [answer] = list(stub.ModelStreamInfer(iter([_infer_request(name)]), timeout=10))
    if answer.error_message.startswith("[INVALID_ARGUMENT] "):
        raise ValueError(answer.error_message.removeprefix("[INVALID_ARGUMENT] "))
    raise AssertionError(f"unexpected stream answer: {answer}")


def _inference(method: str, make: Callable[[str], Any]) -> Call:
    return lambda channel, name: getattr(pb_grpc.GRPCInferenceServiceStub(channel), method)(
        make(name), timeout=10)


def _admin(method: str, make: Callable[[str], Any]) -> Call:
    return lambda channel, name: getattr(admin_grpc.PeregrineAdminStub(channel), method)(
        make(name), timeout=10)


def _route_table(name: str) -> admin.SetRouteRequest:
    return admin.SetRouteRequest(table=admin.RouteTable(
        model=name, variants=[admin.Variant(name="a", weight=100)]))


RPCS: dict[str, Call] = {
    "RepositoryModelLoad": _inference(
        "RepositoryModelLoad", lambda n: pb.RepositoryModelLoadRequest(model_name=n)),
    "RepositoryModelUnload": _inference(
        "RepositoryModelUnload", lambda n: pb.RepositoryModelUnloadRequest(model_name=n)),
    "ModelMetadata": _inference("ModelMetadata", lambda n: pb.ModelMetadataRequest(name=n)),
    "ModelReady": _inference("ModelReady", lambda n: pb.ModelReadyRequest(name=n)),
    "ModelConfig": _inference("ModelConfig", lambda n: pb.ModelConfigRequest(name=n)),
    "ModelStatistics": _inference("ModelStatistics",
                                  lambda n: pb.ModelStatisticsRequest(name=n)),
    "ModelInfer": _inference("ModelInfer", _infer_request),
    "ModelStreamInfer": _stream,
    "SetRoute": _admin("SetRoute", _route_table),
    "SetRoute(variant)": _admin("SetRoute", lambda n: admin.SetRouteRequest(
        table=admin.RouteTable(model=MODEL, variants=[admin.Variant(name="a", model=n,
                                                                    weight=100)]))),
    "GetRoute": _admin("GetRoute", lambda n: admin.RouteRequest(model=n)),
    "ClearRoute": _admin("ClearRoute", lambda n: admin.RouteRequest(model=n)),
    "Promote": _admin("Promote", lambda n: admin.RouteRequest(model=n)),
    "Rollback": _admin("Rollback", lambda n: admin.RouteRequest(model=n)),
    "GetDrift": _admin("GetDrift", lambda n: admin.DriftRequest(model=n)),
}


def refusal(channel: grpc.Channel, rpc: str, name: str) -> str:
    """The INVALID_ARGUMENT message ``rpc`` answers for ``name``."""
    try:
        RPCS[rpc](channel, name)
    except grpc.RpcError as err:
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT, (rpc, name, err.details())
        return str(err.details())
    except ValueError as err:  # the stream's answer
        return str(err)
    raise AssertionError(f"{rpc} accepted the name {name!r}")


@pytest.fixture
def layout(tmp_path: Path) -> dict[str, Path]:
    """``repo/m`` (loaded), ``repo/m2`` (not loaded, a symlink to a file outside in its
    version directory and in its warmup directory), and ``outside/``: a model directory
    beside the repository whose model file works, and warm-up data that would do."""
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, MODEL, 1, 1.0, with_config=True)
    m2 = model_factory.scaled_model_version(repo, "m2", 1, 1.0, with_config=True).parent
    outside = model_factory.scaled_model_version(tmp_path, "outside", 1, 1.0).parent
    (outside / "data.bin").write_bytes(np.ones(WIDTH * 8, dtype=np.float32).tobytes())
    (m2 / "1" / "evil.onnx").symlink_to(outside / "1" / "model.onnx")
    (m2 / "warmup").mkdir()
    (m2 / "warmup" / "evil.bin").symlink_to(outside / "data.bin")
    return {"tmp": tmp_path, "repo": repo, "outside": outside,
            "state": tmp_path / "state.json"}


@pytest.fixture
def server(layout: dict[str, Path]) -> Iterator[ServerThread]:
    with ServerThread(layout["repo"], model_control_mode="explicit", load_model=(MODEL,),
                      state_file=layout["state"]) as running:
        yield running


def settled(state: Path) -> None:
    """Wait until the state file (written by the server's writer thread, in order) remembers
    exactly the model loaded at start."""
    deadline = time.monotonic() + 30
    while not state.exists() or json.loads(state.read_text())["explicit_models"] != [MODEL]:
        assert time.monotonic() < deadline, "the state file never named only the model"
        time.sleep(0.02)


def loaded(url: str) -> dict[str, str]:
    with grpcclient.InferenceServerClient(url) as client:
        return {m.name: m.state for m in client.get_model_repository_index().models
                if m.state == "READY"}


def test_path_like_names_are_refused_by_every_rpc(
    server: ServerThread, layout: dict[str, Path]
) -> None:
    settled(layout["state"])
    state_before = layout["state"].read_bytes()
    mtime_before = layout["state"].stat().st_mtime_ns
    exists, missing = layout["outside"], layout["tmp"] / "missing"
    with grpc.insecure_channel(server.url) as channel:
        for rpc in RPCS:
            for name in BAD_NAMES:
                message = refusal(channel, rpc, name)
                assert "model name" in message, (rpc, name, message)
                assert str(layout["tmp"]) not in message
            # The answer does not tell whether such a path exists.
            for there, not_there in ((str(exists), str(missing)), ("../outside", "../missing")):
                assert refusal(channel, rpc, there) == refusal(channel, rpc, not_there), rpc
    assert loaded(server.url) == {MODEL: "READY"}
    assert layout["state"].read_bytes() == state_before
    assert layout["state"].stat().st_mtime_ns == mtime_before
    assert json.loads(state_before)["explicit_models"] == [MODEL]
    assert not list(layout["tmp"].rglob("routing.json"))
    server.stop()
    with ServerThread(layout["repo"], model_control_mode="explicit",
                      state_file=layout["state"]) as again:
        assert loaded(again.url) == {MODEL: "READY"}


def test_a_well_formed_unknown_name_is_still_not_found(server: ServerThread) -> None:
    with grpc.insecure_channel(server.url) as channel:
        for rpc in ("ModelInfer", "ModelMetadata", "RepositoryModelLoad"):
            with pytest.raises(grpc.RpcError) as err:
                RPCS[rpc](channel, "no_such_model")
            assert err.value.code() == grpc.StatusCode.NOT_FOUND, rpc


def override(**fields: Any) -> str:
    """A config override for ``m2`` (auto-completed from its model file)."""
    return json.dumps({"name": "m2", "max_batch_size": 8, **fields})


def warmup(data_file: str) -> dict[str, Any]:
    return {"model_warmup": [{"name": "w", "batch_size": 1, "inputs": {"INPUT0": {
        "data_type": "TYPE_FP32", "dims": [WIDTH], "input_data_file": data_file}}}]}


@pytest.mark.parametrize(("fields", "field"), [
    ({"default_model_filename": "../../etc/passwd"}, "default_model_filename"),
    ({"default_model_filename": "../../../outside/1/model.onnx"}, "default_model_filename"),
    ({"default_model_filename": "<outside>/1/model.onnx"}, "default_model_filename"),
    ({"default_model_filename": "evil.onnx"}, "default_model_filename"),
    (warmup("../../../outside/data.bin"), "input_data_file"),
    (warmup("<outside>/data.bin"), "input_data_file"),
    (warmup("evil.bin"), "input_data_file"),
], ids=["etc-passwd", "dotdot-to-a-model", "absolute", "symlink-out", "warmup-dotdot",
        "warmup-absolute", "warmup-symlink-out"])
def test_override_paths_stay_inside_the_model_directory(
    server: ServerThread, layout: dict[str, Path], fields: dict[str, Any], field: str
) -> None:
    """Each would load (the file outside is a working model, or enough warm-up data) if the
    server followed it; it fails naming the field, and nothing is loaded or remembered."""
    text = override(**fields).replace("<outside>", str(layout["outside"]))
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("m2", config=text)
        assert field in err.value.message(), err.value.message()
        assert not client.is_model_ready("m2")
        settled(layout["state"])
        client.load_model("m2", config=override())
        assert client.is_model_ready("m2")  # the same load without the path works


@pytest.mark.parametrize(("fields", "message"), [
    ({"instance_group": [{"count": 1000, "kind": "KIND_CPU"}]}, "instance count"),
    ({"max_batch_size": 1 << 20}, "max_batch_size is 1048576"),
    ({"input": [{"name": "INPUT0", "data_type": "TYPE_FP32", "dims": [1 << 30]}]},
     "a dim of input 'INPUT0'"),
    ({"input": [{"name": f"i{i}", "data_type": "TYPE_FP32", "dims": [1]}
                for i in range(300)]}, "the number of inputs is 300"),
    ({"dynamic_batching": {"preferred_batch_size": list(range(1, 101))}},
     "the number of preferred_batch_size values is 100"),
    ({"model_warmup": [{"name": "w", "count": 1 << 20}]}, "the count of model_warmup 'w'"),
])
def test_override_counts_are_capped(
    server: ServerThread, layout: dict[str, Path], fields: dict[str, Any], message: str
) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        with pytest.raises(InferenceServerException) as err:
            client.load_model("m2", config=override(**fields))
        assert err.value.status() == "StatusCode.INVALID_ARGUMENT"
        assert message in err.value.message() and "the limit is" in err.value.message()
        assert not client.is_model_ready("m2")
