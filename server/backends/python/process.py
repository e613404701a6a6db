"""The server's side of one model process: started, spoken to, watched, stopped.

The process is ``python -P -m server.backends.python.stub`` (a new interpreter, not a fork of
the server: none of the server's threads, locks or sockets are in it), in a session of its
own (a terminal's Ctrl-C reaches the server, which stops it in order). It gets one end of a
socket pair and the instance's shared memory (a memfd) as inherited descriptors. Its stdout
and stderr are read line by line into the server's log under the model's name; a waiter
thread learns of its exit at once and tells the instance.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import mmap
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import server
from server.backends.python import wire
from server.errors import ModelLoadError

log = logging.getLogger(__name__)

#: The longest line of a model's output logged whole (the rest of it is logged as more lines).
MAX_LINE_BYTES = 16 << 10
#: Lines of a model's stderr kept, to say why it failed to start.
STDERR_TAIL = 20
#: How long a process whose socket closed has to exit before it is killed.
EXIT_WAIT_S = 2.0
#: Leading words of an output line that set its log level (the model API's Logger writes them;
#: a plain print to stdout is INFO, to stderr WARNING).
_LEVELS = {"INFO": logging.INFO, "WARNING": logging.WARNING, "ERROR": logging.ERROR,
           "VERBOSE": logging.DEBUG}
#: Where the package is, so that the model process imports this same server package.
_PACKAGE_ROOT = str(Path(server.__file__).resolve().parent.parent)


@dataclass(frozen=True, slots=True)
class Launch:
    """What one instance's model process is started with."""

    model: str
    version: str
    instance: int
    #: "python" (a model.py) or "mlflow_pyfunc".
    kind: str
    version_dir: Path
    #: model.py for "python"; the MLmodel file for "mlflow_pyfunc".
    model_file: Path
    #: initialize's args, as Triton gives them (every value a string).
    args: Mapping[str, str]
    #: The size of each of the two shared-memory regions.
    region_bytes: int
    startup_timeout_s: float


class ProcessExited(Exception):
    """The model process went away; the message says how (exit code or signal)."""


class ModelProcess:
    """One running model process. ``call`` is used by one thread at a time (the instance's);
    ``kill`` from any thread."""

    def __init__(self, launch: Launch, on_exit: Callable[[ModelProcess], None]) -> None:
        self.launch = launch
        #: Set once the process is reaped (by the waiter thread).
        self.exited = threading.Event()
        #: Set once its socket closed under a call: no more calls.
        self.dead = False
        self._on_exit = on_exit
        self._stderr_tail: collections.deque[str] = collections.deque(maxlen=STDERR_TAIL)
        size = 2 * launch.region_bytes
        memfd = os.memfd_create("peregrine-model")  # a name for /proc only (a model's may be long)
        try:
            os.ftruncate(memfd, size)
            self._memory = mmap.mmap(memfd, size)
            self.inputs, self.outputs = wire.regions(self._memory, launch.region_bytes)
            self._channel, child = socket.socketpair()
            try:
                self._process = self._spawn(child.fileno(), memfd)
            finally:
                child.close()
        finally:
            os.close(memfd)
        self.pid = self._process.pid
        for stream, name, level in ((self._process.stdout, "stdout", logging.INFO),
                                    (self._process.stderr, "stderr", logging.WARNING)):
            assert stream is not None
            threading.Thread(target=self._forward, args=(stream, name, level), daemon=True,
                             name=f"model-{name}-{launch.model}-{launch.instance}").start()
        threading.Thread(target=self._wait, daemon=True,
                         name=f"model-wait-{launch.model}-{launch.instance}").start()

    def _spawn(self, channel: int, memfd: int) -> subprocess.Popen[bytes]:
        launch = self.launch
        path = os.environ.get("PYTHONPATH")
        env = {**os.environ, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": _PACKAGE_ROOT + (os.pathsep + path if path else "")}
        command = [sys.executable, "-P", "-m", "server.backends.python.stub",
                   "--socket", str(channel), "--memory", str(memfd),
                   "--region-bytes", str(launch.region_bytes), "--parent", str(os.getpid())]
        try:
            return subprocess.Popen(command, pass_fds=(channel, memfd), env=env,
                                    cwd=launch.version_dir, stdin=subprocess.DEVNULL,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    start_new_session=True)
        except OSError as exc:
            self._channel.close()
            self._memory.close()
            raise ModelLoadError(f"cannot start the model process: {exc}") from exc

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Have the model initialised; raises ModelLoadError (the process then stopped) when it
        fails, exits or takes longer than the startup timeout."""
        launch = self.launch
        self.ask({"op": "init", "kind": launch.kind, "model_file": str(launch.model_file),
                  "args": dict(launch.args)}, "initialize")

    def ask(self, message: dict[str, Any], what: str) -> dict[str, Any]:
        """One exchange within the startup timeout (initialize, auto-complete); raises
        ModelLoadError, the process then stopped, when it fails, exits or takes too long."""
        timeout = self.launch.startup_timeout_s
        self._channel.settimeout(timeout)
        try:
            wire.send(self._channel, message)
            reply = wire.receive(self._channel)
        except TimeoutError:
            self.kill()
            self.close()
            raise ModelLoadError(
                f"the model process did not finish {what} within {timeout:g} s (parameter "
                "python_startup_timeout_s)") from None
        except (wire.ChannelClosed, OSError, ValueError):
            how = self.exit_description()
            self.close()
            tail = f"; its last output: {self._stderr_tail[-1]}" if self._stderr_tail else ""
            raise ModelLoadError(f"the model process {how} during {what}{tail}") from None
        self._channel.settimeout(None)
        if "error" in reply:
            self.exit_description()
            self.close()
            raise ModelLoadError(f"{what} failed: {reply['error'].get('message', '')}")
        return reply

    def call(self, message: dict[str, Any]) -> dict[str, Any]:
        """Send a message and wait for the answer, however long it takes (the batcher's
        execution timeout kills a process that hangs). Raises ProcessExited."""
        try:
            wire.send(self._channel, message)
            return wire.receive(self._channel)
        except (wire.ChannelClosed, OSError, ValueError) as exc:
            self.dead = True
            how = self.exit_description()
            if isinstance(exc, ValueError):  # a garbled answer: the process cannot be trusted
                self.kill()
                how = f"answered garbage ({exc})"
            raise ProcessExited(how) from None

    def exit_description(self) -> str:
        """How the process ended ("exited with code 3", "was killed by signal 9 (SIGKILL)"),
        waiting a little for it; one that does not end is killed."""
        if not self.exited.wait(EXIT_WAIT_S):
            self.kill()
            self.exited.wait(EXIT_WAIT_S)
        code = self._process.returncode
        if code is None:
            return "closed its channel"
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = "unknown"
            return f"was killed by signal {-code} ({name})"
        return f"exited with code {code}"

    def kill(self) -> None:
        """SIGKILL to the process and whatever it started in its session."""
        if self.exited.is_set():
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    def stop(self, timeout_s: float) -> None:
        """Have the model finalized and the process exit (killed past ``timeout_s``), then
        release the channel and the shared memory."""
        if not self.exited.is_set() and not self.dead:
            self._channel.settimeout(timeout_s)
            try:
                wire.send(self._channel, {"op": "finalize"})
                reply = wire.receive(self._channel)
                if "error" in reply:
                    log.warning("model finalize failed", extra={
                        "model": self.launch.model, "instance": self.launch.instance,
                        "error": reply["error"].get("message", "")})
            except (TimeoutError, wire.ChannelClosed, OSError, ValueError):
                pass
            if not self.exited.wait(timeout_s):
                self.kill()
                self.exited.wait(EXIT_WAIT_S)
        self.close()

    def close(self) -> None:
        """Release the channel and the shared memory (the process has exited or is killed)."""
        self._channel.close()
        # BufferError: a view is still exported; the mapping goes with its last user.
        with contextlib.suppress(BufferError):
            self._memory.close()

    # -- threads -----------------------------------------------------------------------------

    def _wait(self) -> None:
        self._process.wait()
        self.exited.set()
        self._on_exit(self)

    def _forward(self, stream: IO[bytes], name: str, default: int) -> None:
        """Log each line the model writes, prefixed with its name, at the line's level."""
        launch = self.launch
        extra = {"model": launch.model, "version": launch.version,
                 "instance": launch.instance, "stream": name}
        with stream:
            while raw := stream.readline(MAX_LINE_BYTES):
                line = raw.decode(errors="replace").rstrip("\r\n")
                word, _, rest = line.partition(": ")
                level = _LEVELS.get(word)
                text = rest if level is not None else line
                if name == "stderr":
                    self._stderr_tail.append(text)
                log.log(default if level is None else level, f"{launch.model}: {text}",
                        extra=extra)
