"""The `peregrine` command as a subprocess: help, start-up with JSON logs, readiness, SIGTERM,
settings from the environment and a TOML file, and bad values."""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import tritonclient.grpc as grpcclient

from server.settings import OPTIONS
from tests import model_factory

ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "server.cli"]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


#: The integration suite's rerun switches (tests/integration/test_reruns.py): a `peregrine
#: serve` a test starts runs in that rerun's mode too, as its in-thread servers do.
RERUN_SWITCHES = ("PEREGRINE_NATIVE", "PEREGRINE_FRONTENDS")


def environment(**extra: str) -> dict[str, str]:
    """The environment of a `peregrine` command a test runs: none of the caller's
    PEREGRINE_ settings but the rerun switches."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PEREGRINE_") or k in RERUN_SWITCHES}
    env["COLUMNS"] = "100"
    env.update(extra)
    return env


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60
            ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*COMMAND, *args], cwd=ROOT, env=env or environment(),
                          capture_output=True, text=True, timeout=timeout, check=False)


class Served:
    """A `peregrine serve` subprocess whose stderr lines are collected by a reader thread."""

    def __init__(self, args: list[str], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [*COMMAND, "serve", *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def wait_for_event(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no '{event}' log line; got:\n" + "\n".join(self.lines))
            try:
                line = self._queue.get(timeout=remaining)
            except queue.Empty:
                continue
            if line is None:
                raise AssertionError(
                    f"server exited ({self.proc.poll()}) before '{event}':\n"
                    + "\n".join(self.lines)
                )
            if not line.startswith("{"):
                # Native libraries (onnxruntime, gRPC core) may write their own lines; a line of
                # ours in the text format (it starts with the timestamp) is a failure.
                assert not line[:1].isdigit(), f"text log line in JSON mode: {line}"
                continue
            self.lines.append(line)
            record = json.loads(line)  # each of our lines is one JSON object
            if record.get("event") == event:
                return dict(record)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self._reader.join(timeout=10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli_repo")
    model_factory.add_sub_model(path, "add_sub", max_batch_size=4)
    return path


@pytest.fixture
def served() -> Iterator[list[Served]]:
    started: list[Served] = []
    yield started
    for server in started:
        server.stop()


# -- help ------------------------------------------------------------------------------------------


def test_serve_help_lists_every_option_with_its_env_var() -> None:
    result = run_cli("serve", "--help")
    assert result.returncode == 0, result.stderr
    text = result.stdout
    lines = text.splitlines()
    starts = [i for i, line in enumerate(lines) if line.lstrip().startswith("--")]
    for option in [*OPTIONS]:
        matching = [i for i in starts if lines[i].lstrip().startswith(option.flag + " ")]
        assert matching, f"{option.flag} is missing from `serve --help`"
        begin = matching[0]
        following = [i for i in starts if i > begin]
        block = " ".join(lines[begin: following[0] if following else len(lines)])
        assert option.env in block, f"{option.flag} does not name {option.env}"
    assert "PEREGRINE_CONFIG_FILE" in text and "--config-file" in text


def test_version_flag() -> None:
    result = run_cli("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("peregrine ")


# -- serving ---------------------------------------------------------------------------------------


def test_serve_logs_json_answers_ready_and_stops_on_sigterm(
    repo: Path, served: list[Served]
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    server = Served(
        ["--model-repository", str(repo), "--grpc-port", str(grpc_port),
         "--metrics-port", str(metrics_port), "--log-format", "json"],
        environment(),
    )
    served.append(server)
    started = server.wait_for_event("server started")
    assert started["level"] == "info"
    assert started["grpc"] == f"127.0.0.1:{grpc_port}"
    assert started["metrics"] == f"127.0.0.1:{metrics_port}"
    assert started["ready_versions"] == 1
    assert "ts" in started and "logger" in started
    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        assert client.is_server_ready()
        assert client.is_model_ready("add_sub")
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as r:
        assert b"nv_inference_count" in r.read()

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0
    server.wait_for_event("server stopped", timeout=5)
    events = [json.loads(line)["event"] for line in server.lines]
    assert "model version ready" in events
    assert events.index("server started") < events.index("server stopped")
    assert all(json.loads(line)["level"] in ("debug", "info", "warning", "error", "critical")
               for line in server.lines)


def test_env_var_and_toml_config_file_are_honoured(
    repo: Path, tmp_path: Path, served: list[Served]
) -> None:
    grpc_port, metrics_port = free_port(), free_port()
    config = tmp_path / "peregrine.toml"
    config.write_text(
        "[server]\n"
        f'model_repository = "{repo}"\n'
        f"metrics_port = {metrics_port}\n"
        "grpc_port = 1\n"  # overridden by the environment variable
        'log_format = "json"\n',
        encoding="utf-8",
    )
    server = Served(["--config-file", str(config)],
                    environment(PEREGRINE_GRPC_PORT=str(grpc_port)))
    served.append(server)
    started = server.wait_for_event("server started")
    assert started["grpc"] == f"127.0.0.1:{grpc_port}"
    assert started["metrics"] == f"127.0.0.1:{metrics_port}"
    assert started["repository"] == str(repo)
    with grpcclient.InferenceServerClient(f"127.0.0.1:{grpc_port}") as client:
        assert client.is_server_ready()
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(timeout=15) == 0


# -- bad values ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["--grpc-port", "abc"], {}, "--grpc-port"),
        (["--grpc-port", "70000"], {}, "grpc_port must be within 0..65535"),
        (["--log-format", "xml"], {}, "invalid choice: 'xml'"),
        (["--allow-metrics", "perhaps"], {}, "--allow-metrics"),
        ([], {"PEREGRINE_METRICS_PORT": "http"}, "PEREGRINE_METRICS_PORT"),
        (["--no-such-flag"], {}, "unrecognized arguments: --no-such-flag"),
    ],
)
def test_bad_values_exit_2_with_a_message(
    args: list[str], env: dict[str, str], message: str
) -> None:
    result = run_cli("serve", *args, env=environment(**env))
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_key_in_config_file_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("grpc_prot = 9000\n", encoding="utf-8")
    result = run_cli("serve", "--config-file", str(config))
    assert result.returncode == 2
    assert "unknown option 'grpc_prot'" in result.stderr
