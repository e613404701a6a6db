"""TLS and mutual TLS on the gRPC listener, and certificates replaced while serving."""

from __future__ import annotations

import queue
import socket
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc
from tests import model_factory
from tests.certificates import Pki, make_pki, serial_of
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tls_repo")
    model_factory.add_sub_model(path, "add_sub", max_batch_size=4)
    return path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tls_server(repo: Path, pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(repo, grpc_use_ssl=True, grpc_server_cert=pki.server_cert,
                      grpc_server_key=pki.server_key) as running:
        yield running


@pytest.fixture(scope="module")
def mutual_server(repo: Path, pki: Pki) -> Iterator[ServerThread]:
    with ServerThread(repo, grpc_use_ssl=True, grpc_server_cert=pki.server_cert,
                      grpc_server_key=pki.server_key, grpc_root_cert=pki.ca,
                      grpc_use_ssl_mutual=True) as running:
        yield running


def assert_add_sub_answers(client: grpcclient.InferenceServerClient) -> None:
    a = np.arange(16, dtype=np.float32).reshape(1, 16)
    b = np.ones((1, 16), dtype=np.float32)
    inputs = [grpcclient.InferInput("INPUT0", [1, 16], "FP32"),
              grpcclient.InferInput("INPUT1", [1, 16], "FP32")]
    inputs[0].set_data_from_numpy(a)
    inputs[1].set_data_from_numpy(b)
    result = client.infer("add_sub", inputs, client_timeout=10)
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), a + b)


def tls_client(url: str, pki: Pki, cert: Path | None = None, key: Path | None = None
               ) -> grpcclient.InferenceServerClient:
    return grpcclient.InferenceServerClient(
        url, ssl=True, root_certificates=str(pki.ca),
        certificate_chain=None if cert is None else str(cert),
        private_key=None if key is None else str(key))


def refused(client: grpcclient.InferenceServerClient) -> str:
    with client, pytest.raises(InferenceServerException) as caught:
        client.is_server_live(client_timeout=5)
    return str(caught.value.status())


def peer_serial(port: int, pki: Pki) -> int:
    """The serial of the certificate the server presents to a new connection."""
    context = ssl.create_default_context(cafile=str(pki.ca))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return serial_of(ssl.DER_cert_to_PEM_cert(der))


# -- TLS -------------------------------------------------------------------------------------------


def test_infer_over_tls(tls_server: ServerThread, pki: Pki) -> None:
    with tls_client(tls_server.url, pki) as client:
        assert client.is_server_ready()
        assert_add_sub_answers(client)


def test_a_plaintext_client_is_refused(tls_server: ServerThread) -> None:
    assert refused(grpcclient.InferenceServerClient(tls_server.url)) == "StatusCode.UNAVAILABLE"


def test_a_client_that_trusts_another_ca_is_refused(tls_server: ServerThread,
                                                    tmp_path: Path) -> None:
    other = make_pki(tmp_path)
    assert refused(tls_client(tls_server.url, other)) == "StatusCode.UNAVAILABLE"


# -- mutual TLS ------------------------------------------------------------------------------------


def test_mutual_tls_refuses_a_client_without_a_certificate(mutual_server: ServerThread,
                                                           pki: Pki) -> None:
    assert refused(tls_client(mutual_server.url, pki)) == "StatusCode.UNAVAILABLE"


def test_mutual_tls_refuses_a_certificate_of_another_ca(mutual_server: ServerThread,
                                                        pki: Pki) -> None:
    client = tls_client(mutual_server.url, pki, pki.stranger_cert, pki.stranger_key)
    assert refused(client) == "StatusCode.UNAVAILABLE"


def test_mutual_tls_serves_a_client_with_a_good_certificate(mutual_server: ServerThread,
                                                            pki: Pki) -> None:
    with tls_client(mutual_server.url, pki, pki.client_cert, pki.client_key) as client:
        assert_add_sub_answers(client)


# -- certificate reload ----------------------------------------------------------------------------


def stream_request(i: int) -> pb.ModelInferRequest:
    request = pb.ModelInferRequest(model_name="add_sub", id=str(i))
    for name in ("INPUT0", "INPUT1"):
        request.inputs.add(name=name, datatype="FP32", shape=[1, 16])
        request.raw_input_contents.append(np.full(16, i, dtype=np.float32).tobytes())
    return request


def test_replaced_certificate_serves_new_connections_and_open_ones_carry_on(
    repo: Path, tmp_path: Path
) -> None:
    pki = make_pki(tmp_path)
    first_serial = serial_of(pki.server_cert.read_bytes())
    with ServerThread(repo, grpc_use_ssl=True, grpc_server_cert=pki.server_cert,
                      grpc_server_key=pki.server_key) as server:
        port = int(server.url.rpartition(":")[2])
        credentials = grpc.ssl_channel_credentials(pki.ca.read_bytes())
        with grpc.secure_channel(server.url, credentials) as channel:
            # A stream opened before the change: it cannot survive a reconnection.
            requests: queue.Queue[pb.ModelInferRequest | None] = queue.Queue()
            answers = pb_grpc.GRPCInferenceServiceStub(channel).ModelStreamInfer(
                iter(requests.get, None), timeout=30)
            requests.put(stream_request(0))
            assert next(answers).infer_response.id == "0"
            assert peer_serial(port, pki) == first_serial

            # A key of another certificate: refused, the old certificate stays.
            replacement = pki.authority.issue("server", hosts=("127.0.0.1", "localhost"))
            pki.server_cert.write_bytes(replacement.cert_pem)
            assert peer_serial(port, pki) == first_serial
            # The rotation completes: new connections get the new certificate.
            pki.server_key.write_bytes(replacement.key_pem)
            assert peer_serial(port, pki) == replacement.serial != first_serial

            requests.put(stream_request(1))
            assert next(answers).infer_response.id == "1"
            requests.put(None)
            assert list(answers) == []
        with tls_client(server.url, pki) as client:
            assert_add_sub_answers(client)


def test_serve_exits_1_naming_a_missing_certificate_before_loading_models(
    repo: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing.crt"
    result = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repo),
         "--grpc-port", "0", "--metrics-port", "0", "--grpc-use-ssl", "true",
         "--grpc-server-cert", str(missing), "--grpc-server-key", str(missing)],
        capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 1
    assert f"peregrine serve: --grpc-server-cert {missing}: No such file or directory" in (
        result.stderr)
    assert "Traceback" not in result.stderr and "model version ready" not in result.stderr
