"""The client commands (repo, route, health, drift status) over TLS, mutual TLS and with a
bearer token: against a server that records each call's metadata, and a real TLS server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from server.cli import main
from server.cli.connection import TOKEN_ENV
from tests import model_factory
from tests.certificates import Pki, make_pki
from tests.recording_server import RecordingServer, mutual_tls_credentials
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(60)

#: The recording server's certificate names only this host: clients connect by IP.
SERVER_NAME = "peregrine.test"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), hosts=(SERVER_NAME,))


@pytest.fixture
def recorder(pki: Pki) -> Iterator[RecordingServer]:
    """Mutual TLS: a call that arrives came with the client certificate."""
    with RecordingServer(mutual_tls_credentials(pki)) as running:
        yield running


def tls_flags(url: str, pki: Pki) -> list[str]:
    return ["--url", url, "--ssl", "--root-cert", str(pki.ca), "--client-cert",
            str(pki.client_cert), "--client-key", str(pki.client_key),
            "--ssl-target-name", SERVER_NAME]


COMMANDS = [
    (["health"], [], "Check"),
    (["repo"], ["index"], "RepositoryIndex"),
    (["route"], ["status"], "ListRoutes"),
    (["drift", "status"], [], "GetDrift"),
]


@pytest.mark.parametrize(("command", "action", "method"), COMMANDS)
def test_every_client_command_sends_the_token_over_mutual_tls(
    recorder: RecordingServer, pki: Pki, monkeypatch: pytest.MonkeyPatch,
    command: list[str], action: list[str], method: str,
) -> None:
    monkeypatch.setenv(TOKEN_ENV, "from-the-environment")
    assert main([*command, *tls_flags(recorder.url, pki), *action]) == 0
    assert main([*command, *tls_flags(recorder.url, pki), "--token", "from-the-flag",
                 *action]) == 0
    tokens = [call.metadata.get("authorization") for call in recorder.of(method)]
    assert tokens == ["Bearer from-the-environment", "Bearer from-the-flag"]


def test_no_token_sends_no_authorization(recorder: RecordingServer, pki: Pki,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["health", *tls_flags(recorder.url, pki)]) == 0
    [call] = recorder.of("Check")
    assert "authorization" not in call.metadata


def test_route_sends_the_token_beside_the_operator_after_the_action(
    recorder: RecordingServer, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert main(["route", "clear", "digits", *tls_flags(recorder.url, pki),
                 "--token", "t0k", "--user", "alice"]) == 0
    [call] = recorder.of("ClearRoute")
    assert call.metadata["authorization"] == "Bearer t0k"
    assert call.metadata["x-peregrine-user"] == "alice"


def test_a_wrong_server_name_fails_verification(
    recorder: RecordingServer, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    flags = tls_flags(recorder.url, pki)
    flags[flags.index(SERVER_NAME)] = "other.test"
    assert main(["health", *flags, "--timeout", "5"]) == 1
    assert "unhealthy: UNAVAILABLE" in capsys.readouterr().err
    assert recorder.calls == []


@pytest.mark.parametrize(("flags", "message"), [
    (["--root-cert", "ca.pem"], "--root-cert needs --ssl"),
    (["--ssl", "--client-cert", "c.pem"], "--client-cert and --client-key go together"),
    (["--ssl", "--root-cert", "/no/such/ca.pem"],
     "--root-cert /no/such/ca.pem: No such file or directory"),
])
def test_bad_tls_flags_exit_2_with_one_line(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as caught:
        main(["repo", *flags, "index"])
    assert caught.value.code == 2
    assert capsys.readouterr().err == f"peregrine repo index: {message}\n"


# -- against a real server -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mutual_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ServerThread, Pki]]:
    repo = tmp_path_factory.mktemp("cli_tls_repo")
    model_factory.add_sub_model(repo, "add_sub", max_batch_size=4)
    local = make_pki(tmp_path_factory.mktemp("local_pki"))
    with ServerThread(repo, grpc_use_ssl=True, grpc_server_cert=local.server_cert,
                      grpc_server_key=local.server_key, grpc_root_cert=local.ca,
                      grpc_use_ssl_mutual=True) as running:
        yield running, local


def test_repo_and_health_against_a_mutual_tls_server(
    mutual_server: tuple[ServerThread, Pki], capsys: pytest.CaptureFixture[str]
) -> None:
    server, local = mutual_server
    flags = ["--url", server.url, "--ssl", "--root-cert", str(local.ca),
             "--client-cert", str(local.client_cert), "--client-key", str(local.client_key)]
    assert main(["health", *flags, "--service", "inference.GRPCInferenceService"]) == 0
    assert main(["repo", *flags, "index"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("SERVING\n") and "add_sub" in out and "READY" in out
    # Without the client certificate the handshake is refused.
    assert main(["repo", *flags[:5], "--timeout", "5", "index"]) == 1
    assert "peregrine repo index: UNAVAILABLE" in capsys.readouterr().err
