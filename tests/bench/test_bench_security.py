"""``peregrine bench run`` over mutual TLS with a token: the token goes with every unary request
and once per stream, and stays out of the run document; a real TLS server is driven too."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from bench.loadgen.cli import main as bench_main
from server.cli.connection import redact_token
from tests import model_factory
from tests.certificates import Pki, make_pki
from tests.recording_server import RecordingServer, mutual_tls_credentials
from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(120)

TOKEN = "s3cret-bench-token"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"), hosts=("peregrine.test",))


@pytest.fixture
def recorder(pki: Pki) -> Iterator[RecordingServer]:
    with RecordingServer(mutual_tls_credentials(pki)) as running:
        yield running


def run_bench(url: str, rpc: str, out: Path, *flags: str) -> dict[str, Any]:
    """As ``peregrine bench run ...`` (the document records the command line, sys.argv)."""
    args = ["run", "--url", url, "-m", "m", "--rpc", rpc, "-c", "2", "-n", "20",
            "--warmup", "0", "--json", str(out), "--no-plot", "-q", *flags]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["peregrine", "bench", *args])
        assert bench_main(args) == 0
    document: dict[str, Any] = json.loads(out.read_text())
    return document


@pytest.mark.parametrize(("rpc", "method"), [("unary", "ModelInfer"),
                                             ("stream", "ModelStreamInfer")])
def test_the_token_goes_with_every_call_and_not_into_the_document(
    recorder: RecordingServer, pki: Pki, tmp_path: Path, rpc: str, method: str
) -> None:
    document = run_bench(
        recorder.url, rpc, tmp_path / "run.json", "--ssl", "--root-cert", str(pki.ca),
        "--client-cert", str(pki.client_cert), "--client-key", str(pki.client_key),
        "--ssl-target-name", "peregrine.test", "--token", TOKEN)
    [step] = document["steps"]
    assert step["ok"] == step["sent"] == 20
    calls = recorder.of(method)
    # Unary: one call per request; a stream: one call carries many requests.
    assert len(calls) == 20 if rpc == "unary" else 1 <= len(calls) < 20
    assert {c.metadata.get("authorization") for c in recorder.calls} == {f"Bearer {TOKEN}"}
    assert document["inputs"]["tls"] is True
    assert TOKEN not in json.dumps(document)
    command = document["command"]
    assert command[command.index("--token") + 1] == "***"


def test_a_real_tls_server(tmp_path: Path) -> None:
    pki = make_pki(tmp_path)
    repo = tmp_path / "repo"
    model_factory.add_sub_model(repo, "add_sub", max_queue_delay_microseconds=100)
    with ServerThread(repo, grpc_use_ssl=True, grpc_server_cert=pki.server_cert,
                      grpc_server_key=pki.server_key) as server:
        code = bench_main(["run", "--url", server.url, "-m", "add_sub", "-c", "2", "-n", "20",
                           "--warmup", "0", "--ssl", "--root-cert", str(pki.ca),
                           "--json", str(tmp_path / "run.json"), "--no-plot", "-q"])
    assert code == 0
    [step] = json.loads((tmp_path / "run.json").read_text())["steps"]
    assert step["ok"] == step["sent"] == 20 and step["errors"] == {}


def test_both_spellings_of_the_token_flag_are_redacted() -> None:
    assert redact_token(["run", "--token", "a", "--token=b", "-m", "m"]) == [
        "run", "--token", "***", "--token=***", "-m", "m"]
