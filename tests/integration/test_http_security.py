"""HTTP/REST under the server's security: HTTPS (mutual TLS) with the gRPC listener's
certificates, bearer tokens and client certificates as identities, roles, Triton's restricted
protocol and the audit log, all applied by the same guard as to gRPC."""

from __future__ import annotations

import json
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http.aio as aiohttpclient
from tritonclient.utils import InferenceServerException

from tests import model_factory
from tests.certificates import Pki, make_pki, serial_of
from tests.integration.test_auth import add_identity
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(60)

INFER = json.dumps({"inputs": [{"name": "INPUT0", "shape": [1, 2], "datatype": "FP32",
                                "data": [1.0, 2.0]}]}).encode()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory, pki: Pki
            ) -> Iterator[tuple[ServerThread, dict[str, str], Path]]:
    root = tmp_path_factory.mktemp("http_auth")
    model_factory.identity_model(root / "models", "identity_fp32", "FP32")
    auth_file = root / "auth.toml"
    tokens = {role: add_identity(auth_file, f"{role}-svc", "--roles", role)
              for role in ("infer", "monitor", "admin")}
    add_identity(auth_file, "cert-svc", "--roles", "infer", "--certificate-name", "client")
    audit = root / "audit.jsonl"
    with ServerThread(root / "models", allow_http=True, auth_file=auth_file, audit_log=audit,
                      grpc_use_ssl=True, grpc_server_cert=pki.server_cert,
                      grpc_server_key=pki.server_key, grpc_root_cert=pki.ca,
                      grpc_use_ssl_mutual=True,
                      grpc_restricted_protocol=("model-repository:admin-key=s3cret",),
                      model_control_mode="explicit", load_model=("*",)) as server:
        yield server, tokens, audit


def context(pki: Pki, client_certificate: bool = False) -> ssl.SSLContext:
    """Mutual TLS: a certificate of the server's CA, naming an identity of the auth file
    (``client``) or not (``nobody``: the connection is accepted, the caller unknown)."""
    made = ssl.create_default_context(cafile=str(pki.ca))
    if client_certificate:
        made.load_cert_chain(pki.client_cert, pki.client_key)
    else:
        nobody = pki.client_cert.parent / "nobody.crt"
        if not nobody.exists():
            pki.authority.issue("nobody", client=True).write(nobody.parent, "nobody")
        made.load_cert_chain(nobody, nobody.with_suffix(".key"))
    return made


def call(server: ServerThread, tls: ssl.SSLContext, method: str, path: str,
         body: bytes | None = None, headers: dict[str, str] | None = None
         ) -> tuple[int, dict[str, str], bytes]:
    host = f"localhost:{server.server.http_port}" if server.server else ""
    sent = urllib.request.Request(f"https://{host}{path}", data=body, headers=headers or {},
                                  method=method)
    try:
        with urllib.request.urlopen(sent, timeout=30, context=tls) as answer:
            return answer.status, dict(answer.headers), answer.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def test_https_refuses_a_caller_without_credentials(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    server, _, _ = secured
    tls = context(pki)
    assert call(server, tls, "GET", "/v2/health/ready")[0] == 200  # probes are open
    status, headers, body = call(server, tls, "POST", "/v2/models/identity_fp32/infer", INFER)
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert "credentials required" in json.loads(body)["error"]
    status, _, body = call(server, tls, "POST", "/v2/models/identity_fp32/infer", INFER,
                           bearer("not-a-token"))
    assert status == 401 and "not valid" in json.loads(body)["error"]


def test_a_token_or_a_client_certificate_is_an_identity_with_its_roles(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    server, tokens, _ = secured
    status, _, body = call(server, context(pki), "POST", "/v2/models/identity_fp32/infer",
                           INFER, bearer(tokens["infer"]))
    assert status == 200 and json.loads(body)["outputs"][0]["data"] == [1.0, 2.0]
    status, _, body = call(server, context(pki), "POST", "/v2/models/identity_fp32/infer",
                           INFER, bearer(tokens["monitor"]))
    assert status == 403 and "needs the role" in json.loads(body)["error"]
    assert call(server, context(pki), "GET", "/v2/models/stats",
                headers=bearer(tokens["monitor"]))[0] == 200
    status, _, _ = call(server, context(pki, client_certificate=True), "POST",
                        "/v2/models/identity_fp32/infer", INFER)
    assert status == 200


def test_restricted_protocol_and_the_audit_log(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    server, tokens, audit = secured
    unload = "/v2/repository/models/identity_fp32/unload"
    status, _, body = call(server, context(pki), "POST", unload, b"{}", bearer(tokens["admin"]))
    assert status == 503 and "expecting header 'admin-key'" in json.loads(body)["error"]
    headers = {**bearer(tokens["admin"]), "admin-key": "s3cret"}
    assert call(server, context(pki), "POST", unload, b"{}", headers)[0] == 200
    assert call(server, context(pki), "POST", "/v2/repository/models/identity_fp32/load",
                b"{}", headers)[0] == 200
    deadline = time.monotonic() + 10
    while True:
        lines = [json.loads(line) for line in audit.read_text().splitlines()]
        done = [line for line in lines if line["rpc"].endswith("RepositoryModelUnload")
                and line["outcome"] == "OK"]
        if done or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert done and done[0]["identity"] == "admin-svc"
    assert done[0]["peer"].startswith("ipv4:127.0.0.1:")


def test_plain_http_and_clients_without_a_certificate_are_refused(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    server, _, _ = secured
    assert server.server is not None
    with pytest.raises((urllib.error.URLError, ConnectionError)):
        urllib.request.urlopen(f"http://127.0.0.1:{server.server.http_port}/v2/health/live",
                               timeout=10)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        call(server, ssl.create_default_context(cafile=str(pki.ca)), "GET", "/v2/health/live")
    stranger = ssl.create_default_context(cafile=str(pki.ca))
    stranger.load_cert_chain(pki.stranger_cert, pki.stranger_key)
    with pytest.raises((urllib.error.URLError, ConnectionError, ssl.SSLError)):
        call(server, stranger, "GET", "/v2/health/live")


async def test_the_asyncio_client_over_https(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    server, tokens, _ = secured
    assert server.server is not None
    client = aiohttpclient.InferenceServerClient(
        f"localhost:{server.server.http_port}", ssl=True, ssl_context=context(pki))
    try:
        tensor = aiohttpclient.InferInput("INPUT0", [1, 3], "FP32")
        tensor.set_data_from_numpy(np.array([[1, 2, 3]], dtype=np.float32))
        with pytest.raises(InferenceServerException) as refused:
            await client.infer("identity_fp32", [tensor])
        assert refused.value.status() == "401"
        result = await client.infer("identity_fp32", [tensor], headers=bearer(tokens["infer"]))
        assert result.as_numpy("OUTPUT0").tolist() == [[1.0, 2.0, 3.0]]
    finally:
        await client.close()


def served_serial(port: int, pki: Pki) -> int:
    """The serial of the certificate the HTTPS port presents to a new connection."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context(pki).wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der))


def test_a_replaced_certificate_serves_new_https_connections(
        secured: tuple[ServerThread, dict[str, str], Path], pki: Pki) -> None:
    """Last in the module: it rotates the server's certificate (issued by the same CA)."""
    server, _, _ = secured
    assert server.server is not None
    port = server.server.http_port
    first = served_serial(port, pki)
    replacement = pki.authority.issue("server", hosts=("127.0.0.1", "localhost"))
    pki.server_cert.write_bytes(replacement.cert_pem)
    assert served_serial(port, pki) == first  # a key of another certificate: not taken
    pki.server_key.write_bytes(replacement.key_pem)
    assert served_serial(port, pki) == replacement.serial != first
    assert call(server, context(pki), "GET", "/v2/health/live")[0] == 200
