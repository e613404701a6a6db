"""Identities, roles, model limits, rate limits, the restricted protocol, reflection and the
audit log, black-box against a real server on 127.0.0.1 with an auth file."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2, grpc_service_pb2
from server.security.identity import Role
from server.security.rules import ADMIN, INFERENCE, RULES
from tests import model_factory
from tests.certificates import make_pki
from tests.server_harness import ServerThread
from tests.triton_shm import load as load_shared_memory

ROLES = ("infer", "monitor", "admin")


def add_identity(auth_file: Path, name: str, *options: str) -> str:
    """`peregrine auth add` as an operator runs it; returns the token it prints."""
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "auth", "add", name, "--auth-file",
         str(auth_file), *options], capture_output=True, text=True, check=True, timeout=60)
    return done.stdout.strip()


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread,
                                                                         dict[str, str]]]:
    root = tmp_path_factory.mktemp("auth")
    repo = root / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    model_factory.identity_model(repo, "other", "FP32")
    auth_file = root / "auth.toml"
    tokens = {role: add_identity(auth_file, f"{role}-svc", "--roles", role) for role in ROLES}
    tokens["limited"] = add_identity(auth_file, "limited-svc", "--roles", "infer",
                                     "--models", "identity_fp32")
    tokens["throttled"] = add_identity(auth_file, "throttled-svc", "--roles", "infer",
                                       "--rate-limit", "0.001:3")
    with ServerThread(repo, auth_file=auth_file, audit_log=root / "audit.jsonl",
                      model_control_mode="explicit", load_model=("*",)) as server:
        yield server, tokens


def bearer(token: str | None) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")] if token else []


def call(server: ServerThread, method: str, token: str | None,
         request: Any = None) -> grpc.StatusCode:
    """Call any RPC with an empty (or given) request; the status it ends with."""
    service, name = method.strip("/").split("/")
    module = grpc_service_pb2 if service == INFERENCE else admin_pb2
    descriptor = module.DESCRIPTOR.services_by_name[service.rsplit(".", 1)[1]]
    spec = descriptor.methods_by_name[name]
    request_type = getattr(module, spec.input_type.name)
    response_type = getattr(module, spec.output_type.name)
    message = request if request is not None else request_type()
    with grpc.insecure_channel(server.url) as channel:
        try:
            if spec.client_streaming:
                stream = channel.stream_stream(
                    method, request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString)
                list(stream(iter([message]), metadata=bearer(token), timeout=20))
            else:
                unary = channel.unary_unary(
                    method, request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString)
                unary(message, metadata=bearer(token), timeout=20)
        except grpc.RpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


GUARDED = sorted(m for m in RULES if m.startswith((f"/{INFERENCE}/", f"/{ADMIN}/")))


def test_every_rpc_of_every_service_has_a_rule() -> None:
    services = [grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"],
                admin_pb2.DESCRIPTOR.services_by_name["PeregrineAdmin"]]
    offered = {f"/{s.full_name}/{m.name}" for s in services for m in s.methods}
    assert offered == set(GUARDED)


@pytest.mark.parametrize("method", GUARDED)
def test_each_role_against_each_rpc(secured: tuple[ServerThread, dict[str, str]],
                                    method: str) -> None:
    server, tokens = secured
    rule = RULES[method]
    refusals = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
    anonymous = call(server, method, None)
    if not rule.roles:
        assert anonymous not in refusals
    else:
        assert anonymous is grpc.StatusCode.UNAUTHENTICATED
    assert call(server, method, "0123456789ab.not-a-real-secret") is (
        grpc.StatusCode.UNAUTHENTICATED if rule.roles else call(server, method, None))
    for role in ROLES:
        code = call(server, method, tokens[role])
        if not rule.roles or Role(role) in rule.roles:
            assert code not in refusals, (role, code)
        else:
            assert code is grpc.StatusCode.PERMISSION_DENIED, (role, code)


def infer(server: ServerThread, token: str | None, model: str = "identity_fp32") -> None:
    client = grpcclient.InferenceServerClient(server.url)
    x = np.ones((1, 4), np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
    inputs[0].set_data_from_numpy(x)
    result = client.infer(model, inputs, headers=dict(bearer(token)))
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), x)


def refusal(server: ServerThread, token: str | None, model: str) -> InferenceServerException:
    with pytest.raises(InferenceServerException) as raised:
        infer(server, token, model)
    return raised.value


def test_health_and_liveness_stay_open(secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, _ = secured
    with grpc.insecure_channel(server.url) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert grpcclient.InferenceServerClient(server.url).is_server_live()


def test_a_token_limited_to_models_uses_only_those(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, tokens = secured
    infer(server, tokens["limited"])
    other = refusal(server, tokens["limited"], "other")
    missing = refusal(server, tokens["limited"], "no_such_model")
    assert other.status() == "StatusCode.PERMISSION_DENIED"
    assert "may not use model 'other'" in other.message()
    # The same answer whether the model exists or not.
    assert missing.message() == other.message().replace("'other'", "'no_such_model'")
    code = call(server, f"/{INFERENCE}/ModelMetadata", tokens["limited"],
                grpc_service_pb2.ModelMetadataRequest(name="other"))
    assert code is grpc.StatusCode.PERMISSION_DENIED
    assert call(server, f"/{INFERENCE}/ModelMetadata", tokens["limited"],
                grpc_service_pb2.ModelMetadataRequest(name="identity_fp32")) \
        is grpc.StatusCode.OK


def test_a_stream_checks_each_request_against_the_models_allowed(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, tokens = secured
    answers: list[Any] = []
    client = grpcclient.InferenceServerClient(server.url)
    client.start_stream(lambda result, error: answers.append((result, error)),
                        headers=dict(bearer(tokens["limited"])))
    for model in ("identity_fp32", "other"):
        inputs = [grpcclient.InferInput("INPUT0", [1, 4], "FP32")]
        inputs[0].set_data_from_numpy(np.ones((1, 4), np.float32))
        client.async_stream_infer(model, inputs, request_id=model)
    deadline = time.monotonic() + 20
    while len(answers) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    client.stop_stream()
    assert len(answers) == 2
    errors = [error for _, error in answers if error is not None]
    assert len(errors) == 1 and "PERMISSION_DENIED" in str(errors[0])


def metric_value(server: ServerThread, name: str, **labels: str) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v
                                           for k, v in labels.items()):
                return float(sample.value)
    return 0.0


def test_the_rate_limit_admits_the_burst_then_refuses_with_a_retry_delay(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, tokens = secured
    before = metric_value(server, "peregrine_rate_limited_total", identity="throttled-svc")
    for _ in range(3):  # the burst
        infer(server, tokens["throttled"])
    request = grpc_service_pb2.ModelInferRequest(model_name="identity_fp32")
    tensor = request.inputs.add(name="INPUT0", datatype="FP32", shape=[1, 1])
    tensor.contents.fp32_contents.append(1.0)
    with grpc.insecure_channel(server.url) as channel:
        unary = channel.unary_unary(
            f"/{INFERENCE}/ModelInfer",
            request_serializer=grpc_service_pb2.ModelInferRequest.SerializeToString,
            response_deserializer=grpc_service_pb2.ModelInferResponse.FromString)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as raised:
                unary(request, metadata=bearer(tokens["throttled"]), timeout=20)
            error = raised.value
            assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "rate limit of identity 'throttled-svc'" in error.details()
            trailing = dict(error.trailing_metadata() or ())
            assert int(trailing["grpc-retry-pushback-ms"]) > 1000
    after = metric_value(server, "peregrine_rate_limited_total", identity="throttled-svc")
    assert after - before == 2
    infer(server, tokens["infer"])  # another identity is not throttled


def reflected_services(server: ServerThread, token: str | None) -> set[str]:
    with grpc.insecure_channel(server.url) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        responses = stub.ServerReflectionInfo(iter([request]), metadata=bearer(token),
                                              timeout=20)
        return {s.name for r in responses for s in r.list_services_response.service}


def test_reflection_lists_only_what_the_caller_may_call(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, tokens = secured
    open_services = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    assert reflected_services(server, None) == open_services
    assert reflected_services(server, tokens["infer"]) == open_services | {INFERENCE}
    assert reflected_services(server, tokens["admin"]) == open_services | {INFERENCE, ADMIN}


def audit_lines(server: ServerThread) -> list[dict[str, Any]]:
    path = server.settings.audit_log
    assert path is not None
    return [json.loads(line) for line in path.read_text().splitlines()]


def audit_lines_after(server: ServerThread, seen: int, count: int) -> list[dict[str, Any]]:
    """The lines after the first ``seen``, once there are ``count`` (a failed action's line is
    written as its handler unwinds, just after the client already has the status)."""
    deadline = time.monotonic() + 10
    while len(lines := audit_lines(server)[seen:]) < count and time.monotonic() < deadline:
        time.sleep(0.05)
    return lines


def test_control_actions_and_refusals_are_audited_with_the_authenticated_identity(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, tokens = secured
    seen = len(audit_lines(server))
    client = grpcclient.InferenceServerClient(server.url)
    # A client-supplied user header must not stand in for the identity.
    headers = {**dict(bearer(tokens["admin"])), "x-peregrine-user": "mallory"}
    client.unload_model("other", headers=headers)
    client.load_model("other", headers=headers)
    with pytest.raises(InferenceServerException):
        client.unload_model("other", headers=dict(bearer(tokens["infer"])))
    with pytest.raises(InferenceServerException):
        client.load_model("../etc", headers=dict(bearer(tokens["admin"])))
    lines = audit_lines_after(server, seen, 4)
    actions = [(line["rpc"].rsplit("/", 1)[1], line["identity"], line["target"],
                line["outcome"]) for line in lines]
    assert actions == [
        ("RepositoryModelUnload", "admin-svc", "other", "OK"),
        ("RepositoryModelLoad", "admin-svc", "other", "OK"),
        ("RepositoryModelUnload", "infer-svc", "other", "PERMISSION_DENIED"),
        ("RepositoryModelLoad", "admin-svc", "../etc", actions[3][3]),
    ]
    assert actions[3][3] != "OK"
    assert all(line["peer"].startswith(("ipv4:127.0.0.1", "ipv6:[::1]")) for line in lines)
    assert all(line["auth"] == "token" for line in lines)
    assert "mallory" not in json.dumps(lines)


def test_an_unknown_token_is_refused_and_audited(
        secured: tuple[ServerThread, dict[str, str]]) -> None:
    server, _ = secured
    seen = len(audit_lines(server))
    error = refusal(server, "0123456789ab.wrong", "identity_fp32")
    assert error.status() == "StatusCode.UNAUTHENTICATED"
    lines = audit_lines(server)[seen:]
    assert [(line["outcome"], line["identity"]) for line in lines] == [
        ("UNAUTHENTICATED", "")]


def test_the_auth_file_is_reread_when_it_changes(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    auth_file = tmp_path / "auth.toml"
    first = add_identity(auth_file, "first", "--roles", "infer")
    with ServerThread(repo, auth_file=auth_file) as server:
        infer(server, first)
        second = add_identity(auth_file, "second", "--roles", "infer")
        deadline = time.monotonic() + 20
        while True:
            try:
                infer(server, second)
                break
            except InferenceServerException:
                assert time.monotonic() < deadline, "the new identity never took effect"
                time.sleep(0.2)
        auth_file.write_text("\n".join(
            block for block in auth_file.read_text().split("\n\n") if '"first"' not in block))
        deadline = time.monotonic() + 20
        while True:
            try:
                infer(server, first)
            except InferenceServerException as exc:
                assert exc.status() == "StatusCode.UNAUTHENTICATED"
                break
            assert time.monotonic() < deadline, "the removed identity still works"
            time.sleep(0.2)
        infer(server, second)
        # A file that no longer parses keeps the identities in force.
        auth_file.write_text("[[identity]]\nname = 3\n")
        time.sleep(3)
        infer(server, second)


def test_triton_restricted_protocol_needs_its_header(tmp_path: Path) -> None:
    repo = tmp_path / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    with ServerThread(repo, grpc_restricted_protocol=(
            "model-repository,statistics:admin-key=s3cret",)) as server:
        client = grpcclient.InferenceServerClient(server.url)
        with pytest.raises(InferenceServerException) as raised:
            client.get_model_repository_index()
        assert raised.value.status() == "StatusCode.UNAVAILABLE"
        assert "This protocol is restricted, expecting header 'admin-key'" in \
            raised.value.message()
        with pytest.raises(InferenceServerException):
            client.get_model_repository_index(headers={"admin-key": "wrong"})
        assert client.get_model_repository_index(headers={"admin-key": "s3cret"})
        infer(server, None)  # other groups stay open


def test_a_shared_memory_region_is_its_registrants_alone(tmp_path: Path) -> None:
    shm = load_shared_memory()
    repo = tmp_path / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    auth_file = tmp_path / "auth.toml"
    alice = add_identity(auth_file, "alice", "--roles", "infer,admin")
    bob = add_identity(auth_file, "bob", "--roles", "infer,admin")
    key = f"/peregrine-auth-{os.getpid()}"
    handle = shm.create_shared_memory_region("alice-in", key, 16)
    try:
        x = np.arange(4, dtype=np.float32).reshape(1, 4)
        shm.set_shared_memory_region(handle, [x])
        with ServerThread(repo, auth_file=auth_file, allow_client_shm=True) as server:
            client = grpcclient.InferenceServerClient(server.url)
            as_alice, as_bob = dict(bearer(alice)), dict(bearer(bob))
            client.register_system_shared_memory("in", key, 16, headers=as_alice)

            def infer_from_region(headers: dict[str, str]) -> Any:
                tensor = grpcclient.InferInput("INPUT0", [1, 4], "FP32")
                tensor.set_shared_memory("in", 16)
                return client.infer("identity_fp32", [tensor], headers=headers)

            np.testing.assert_array_equal(infer_from_region(as_alice).as_numpy("OUTPUT0"), x)
            # Bob sees nothing, cannot use alice's region, and his unregister-all leaves it.
            assert not client.get_system_shared_memory_status(headers=as_bob).regions
            with pytest.raises(InferenceServerException) as raised:
                client.get_system_shared_memory_status("in", headers=as_bob)
            assert raised.value.status() == "StatusCode.NOT_FOUND"
            with pytest.raises(InferenceServerException) as raised:
                infer_from_region(as_bob)
            assert raised.value.status() == "StatusCode.INVALID_ARGUMENT"
            client.unregister_system_shared_memory("in", headers=as_bob)
            client.unregister_system_shared_memory(headers=as_bob)
            assert set(client.get_system_shared_memory_status(headers=as_alice).regions) \
                == {"in"}
            # Bob may hold a region of the same name: names are per identity.
            client.register_system_shared_memory("in", key, 16, headers=as_bob)
            np.testing.assert_array_equal(infer_from_region(as_bob).as_numpy("OUTPUT0"), x)
            client.unregister_system_shared_memory(headers=as_alice)
            assert set(client.get_system_shared_memory_status(headers=as_bob).regions) \
                == {"in"}
            # An infer-only identity may not register at all.
            viewer = add_identity(auth_file, "viewer", "--roles", "infer")
            time.sleep(3)  # the auth file is re-read within two seconds
            with pytest.raises(InferenceServerException) as raised:
                client.register_system_shared_memory("v", key, 16, headers=dict(bearer(viewer)))
            assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
    finally:
        shm.destroy_shared_memory_region(handle)


def test_a_verified_client_certificate_is_an_identity(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    unknown_cert, unknown_key = pki.authority.issue("unknown", client=True).write(
        tmp_path, "unknown")
    repo = tmp_path / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    auth_file = tmp_path / "auth.toml"
    subprocess.run([sys.executable, "-m", "server.cli", "auth", "add", "svc", "--auth-file",
                    str(auth_file), "--roles", "infer", "--certificate-name", "client"],
                   check=True, capture_output=True, timeout=60)
    admin_token = add_identity(auth_file, "ops", "--roles", "admin")
    with ServerThread(repo, auth_file=auth_file, grpc_use_ssl=True,
                      grpc_server_cert=pki.server_cert, grpc_server_key=pki.server_key,
                      grpc_root_cert=pki.ca, grpc_use_ssl_mutual=True) as server:

        def client(cert: Path, key: Path) -> grpcclient.InferenceServerClient:
            return grpcclient.InferenceServerClient(
                server.url, ssl=True, root_certificates=str(pki.ca),
                certificate_chain=str(cert), private_key=str(key))

        known = client(pki.client_cert, pki.client_key)
        tensor = grpcclient.InferInput("INPUT0", [1, 2], "FP32")
        tensor.set_data_from_numpy(np.ones((1, 2), np.float32))
        assert known.infer("identity_fp32", [tensor]).as_numpy("OUTPUT0").shape == (1, 2)
        with pytest.raises(InferenceServerException) as raised:
            known.get_inference_statistics()  # svc has the infer role only
        assert raised.value.status() == "StatusCode.PERMISSION_DENIED"
        assert "identity 'svc'" in raised.value.message()
        # A token, when sent, wins over the certificate.
        assert known.get_model_repository_index(headers=dict(bearer(admin_token))) is not None
        stranger = client(unknown_cert, unknown_key)  # verified, but named nowhere
        with pytest.raises(InferenceServerException) as raised:
            stranger.infer("identity_fp32", [tensor])
        assert raised.value.status() == "StatusCode.UNAUTHENTICATED"


def test_a_bad_auth_file_stops_serve_with_one_line(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from server.cli.main import main

    repo = tmp_path / "models"
    model_factory.identity_model(repo, "identity_fp32", "FP32")
    (tmp_path / "auth.toml").write_text("[[identity]]\nname = 'x'\nroles = ['root']\n")
    for auth_file in (tmp_path / "missing.toml", tmp_path / "auth.toml"):
        assert main(["serve", "--model-repository", str(repo), "--grpc-port", "0",
                     "--metrics-port", "0", "--auth-file", str(auth_file)]) == 1
        error = capsys.readouterr().err.strip()
        assert error.startswith(f"peregrine serve: auth file {auth_file}")
        assert len(error.splitlines()) == 1
