"""The metrics endpoint binds to --metrics-address (127.0.0.1 by default), apart from --host."""

from __future__ import annotations

import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.server_harness import ServerThread

pytestmark = pytest.mark.timeout(60)


def scrape(address: str, port: int) -> bool:
    """True when /metrics answers at address:port; False when the connection is refused."""
    try:
        with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as reply:
            return b"# HELP" in reply.read()
    except urllib.error.URLError as exc:
        assert isinstance(exc.reason, ConnectionRefusedError), exc
        return False


@pytest.mark.parametrize(("overrides", "bound", "not_bound"), [
    ({}, "127.0.0.1", "127.0.0.2"),
    ({"metrics_address": "127.0.0.2"}, "127.0.0.2", "127.0.0.1"),
])
def test_metrics_listen_only_on_their_address(
    tmp_path: Path, overrides: dict[str, str], bound: str, not_bound: str
) -> None:
    with ServerThread(tmp_path, **overrides) as server:
        assert server.server is not None
        port = server.server.metrics_port
        assert scrape(bound, port)
        assert not scrape(not_bound, port)
