"""The gRPC listener's TLS files are checked at start, each problem named in one line; the TLS
settings that do not go together are refused by ``peregrine serve`` before anything starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from server.cli import main
from server.security.tls import TlsFileError, server_credentials
from server.settings import ServerSettings
from tests.certificates import Pki, make_pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return make_pki(tmp_path)


def settings(pki: Pki, **changes: object) -> ServerSettings:
    values: dict[str, object] = {"grpc_use_ssl": True, "grpc_server_cert": pki.server_cert,
                                 "grpc_server_key": pki.server_key}
    values.update(changes)
    return ServerSettings(**values)  # type: ignore[arg-type]


def problem(pki: Pki, **changes: object) -> str:
    with pytest.raises(TlsFileError) as caught:
        server_credentials(settings(pki, **changes))
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_good_files_give_credentials_and_plaintext_gives_none(pki: Pki) -> None:
    assert server_credentials(settings(pki)) is not None
    assert server_credentials(settings(pki, grpc_root_cert=pki.ca,
                                       grpc_use_ssl_mutual=True)) is not None
    assert server_credentials(ServerSettings()) is None


def test_a_missing_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "nope.crt"
    assert problem(pki, grpc_server_cert=missing) == (
        f"--grpc-server-cert {missing}: No such file or directory")
    assert problem(pki, grpc_root_cert=missing, grpc_use_ssl_mutual=True) == (
        f"--grpc-root-cert {missing}: No such file or directory")


def test_a_file_that_is_not_pem_is_named(pki: Pki, tmp_path: Path) -> None:
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate\n")
    assert problem(pki, grpc_server_cert=junk).startswith(
        f"--grpc-server-cert {junk}: not PEM certificates")
    assert problem(pki, grpc_root_cert=junk).startswith(
        f"--grpc-root-cert {junk}: not PEM certificates")
    assert problem(pki, grpc_server_key=junk).startswith(
        f"--grpc-server-key {junk}: not a PEM private key")


def test_a_key_of_another_certificate_is_refused(pki: Pki) -> None:
    assert problem(pki, grpc_server_key=pki.client_key) == (
        f"--grpc-server-key {pki.client_key}: the key does not match the certificate")


def test_an_encrypted_key_is_refused_without_asking_for_a_password(pki: Pki,
                                                                    tmp_path: Path) -> None:
    key = serialization.load_pem_private_key(pki.server_key.read_bytes(), None)
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret")))
    assert "an encrypted key" in problem(pki, grpc_server_key=encrypted)


@pytest.mark.parametrize(("flags", "message"), [
    (["--grpc-use-ssl", "true"], "grpc_use_ssl needs grpc_server_cert and grpc_server_key"),
    (["--grpc-use-ssl", "true", "--grpc-server-cert", "c.pem", "--grpc-server-key", "k.pem",
      "--grpc-use-ssl-mutual", "true"], "grpc_use_ssl_mutual needs grpc_root_cert"),
    (["--grpc-server-cert", "c.pem"], "need grpc_use_ssl true"),
])
def test_serve_refuses_tls_settings_that_do_not_go_together(
    flags: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("peregrine serve: ") and message in err
    assert len(err.strip().splitlines()) == 1
