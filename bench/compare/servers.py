"""Servers started as subprocesses on 127.0.0.1, optionally pinned with ``taskset -c``."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import tritonclient.grpc as triton
from tritonclient.utils import InferenceServerException

from bench.loadgen.environment import REPO_ROOT


def free_port() -> int:
    """A port free on 127.0.0.1 right now (another process could still take it first)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pinned(argv: Sequence[str], cpus: str | None) -> list[str]:
    """``argv`` under ``taskset -c cpus`` (taskset execs, so the pid stays the server's)."""
    if cpus is None or shutil.which("taskset") is None:
        return list(argv)
    return ["taskset", "-c", cpus, *argv]


class ServerProcess:
    """A server subprocess; ``start()`` returns once its ServerReady RPC says true (over TLS,
    verified with ``root_cert``, when given)."""

    def __init__(self, name: str, argv: Sequence[str], port: int, cpus: str | None = None,
                 env: Mapping[str, str] | None = None, cwd: Path | None = None,
                 ready_timeout_s: float = 120.0, root_cert: Path | None = None) -> None:
        self.name = name
        self.argv = pinned(argv, cpus)
        self.port = port
        self.cpus = cpus
        self._env = {**os.environ, **(env or {})}
        self._cwd = cwd
        self._ready_timeout = ready_timeout_s
        self._root_cert = root_cert
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_fd, log_path = tempfile.mkstemp(prefix=f"bench-{name}-", suffix=".log")
        self.log_path = Path(log_path)

    @property
    def url(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    def running(self) -> bool:
        """Started and not exited (a crash shows here)."""
        return self._proc is not None and self._proc.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> ServerProcess:
        self._proc = subprocess.Popen(self.argv, stdout=self._log_fd, stderr=subprocess.STDOUT,
                                      env=self._env, cwd=self._cwd, start_new_session=True)
        deadline = time.monotonic() + self._ready_timeout
        client = triton.InferenceServerClient(
            self.url, ssl=self._root_cert is not None,
            root_certificates=str(self._root_cert) if self._root_cert else None)
        try:
            while time.monotonic() < deadline:
                if self._proc.poll() is not None:
                    raise RuntimeError(f"{self.name} exited with {self._proc.returncode}:\n"
                                       + self.log_tail())
                try:
                    if client.is_server_ready(client_timeout=1.0):
                        return self
                except InferenceServerException:
                    pass
                time.sleep(0.25)
        finally:
            client.close()
        self.stop()
        raise TimeoutError(f"{self.name} not ready after {self._ready_timeout:.0f} s:\n"
                           + self.log_tail())

    def stop(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        """Stop; keep the log (its path is in the error) only when the block failed."""
        self.stop()
        os.close(self._log_fd)
        if exc[0] is None:
            self.log_path.unlink(missing_ok=True)


class NoopServer(ServerProcess):
    """bench/compare/noop_server.py; with ``repository`` it describes those models
    (for perf_analyzer); ``extra_args`` are its own (--raw-infer, --max-message-bytes)."""

    def __init__(self, cpus: str | None = None, port: int | None = None,
                 repository: Path | None = None, extra_args: Sequence[str] = (),
                 env: Mapping[str, str] | None = None) -> None:
        port = port or free_port()
        describe = [] if repository is None else ["--model-repository", str(repository)]
        super().__init__("noop", [sys.executable, "-m", "bench.compare.noop_server",
                                  "--port", str(port), *describe, *extra_args],
                         port, cpus, env=env, cwd=REPO_ROOT)


class PlainServer(ServerProcess):
    """bench/compare/plain_server.py on ``repository``: the plain-Python batching yardstick."""

    def __init__(self, repository: Path, cpus: str | None = None) -> None:
        port = free_port()
        super().__init__("plain", [sys.executable, "-m", "bench.compare.plain_server",
                                   "--port", str(port), "--model-repository", str(repository)],
                         port, cpus, cwd=REPO_ROOT)


class PeregrineProcess(ServerProcess):
    """``peregrine serve`` on ``repository``; ``launcher`` replaces the ``-m server.cli``
    entry point (bench.studies.ablation_server wraps it)."""

    def __init__(self, repository: Path, cpus: str | None = None, name: str = "peregrine",
                 extra_args: Sequence[str] = (),
                 launcher: Sequence[str] = ("-m", "server.cli"),
                 root_cert: Path | None = None) -> None:
        port = free_port()
        argv = [sys.executable, *launcher, "serve", "--model-repository",
                str(repository), "--grpc-port", str(port), "--metrics-port", "0",
                "--log-level", "warning", *extra_args]
        super().__init__(name, argv, port, cpus, cwd=REPO_ROOT, root_cert=root_cert)
