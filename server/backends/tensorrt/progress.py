"""TensorRT's logger (forwarded to Python logging) and engine build progress (a bar for the
CLI, periodic INFO logs for the server)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, TextIO

#: One logger for the whole backend, named as before its split into modules.
log = logging.getLogger(__package__)

_logger_lock = threading.Lock()
_trt_logger: Any = None


def trt_logger(trt: Any) -> Any:
    """One process-wide TensorRT logger that forwards to Python logging."""
    global _trt_logger
    with _logger_lock:
        if _trt_logger is None:
            severity = trt.ILogger.Severity
            levels = {
                severity.INTERNAL_ERROR: logging.CRITICAL,
                severity.ERROR: logging.ERROR,
                severity.WARNING: logging.WARNING,
                severity.INFO: logging.DEBUG,
                severity.VERBOSE: logging.DEBUG,
            }

            class Logger(trt.ILogger):  # type: ignore[misc]
                def __init__(self) -> None:
                    trt.ILogger.__init__(self)

                def log(self, sev: Any, msg: str) -> None:
                    log.log(levels.get(sev, logging.INFO), "tensorrt: %s", msg)

            _trt_logger = Logger()
        return _trt_logger


class BuildProgress:
    """Build progress from TensorRT's IProgressMonitor callbacks (called from TensorRT's
    threads): a bar on ``stream`` (the CLI) and INFO logs at most every ``log_every_s``.

    ``step_complete`` returns False once ``cancel()`` was called, which stops the build.
    """

    def __init__(self, label: str, stream: TextIO | None = None, log_every_s: float = 5.0,
                 width: int = 30) -> None:
        self.label = label
        self._stream = stream
        self._tty = bool(stream is not None and getattr(stream, "isatty", lambda: False)())
        self._log_every = log_every_s
        self._width = width
        self._lock = threading.Lock()
        self._phases: dict[str, list[Any]] = {}  # name -> [parent, steps, done]
        self._started = time.monotonic()
        self._last_log = 0.0
        self._cancelled = False
        self.events = 0

    def cancel(self) -> None:
        self._cancelled = True

    def phase_start(self, name: str, parent: str | None, steps: int) -> None:
        with self._lock:
            self.events += 1
            self._phases[name] = [parent, max(1, int(steps)), 0]
            if parent is None:
                log.info("tensorrt build phase", extra={"model": self.label, "phase": name,
                                                       "steps": steps})
                if self._stream is not None and not self._tty:
                    print(f"{self.label}: {name} ({steps} steps)", file=self._stream, flush=True)
            self._draw()

    def step_complete(self, name: str, step: int) -> bool:
        with self._lock:
            self.events += 1
            phase = self._phases.get(name)
            if phase is not None:
                phase[2] = int(step) + 1
            now = time.monotonic()
            if now - self._last_log >= self._log_every:
                self._last_log = now
                log.info("tensorrt build progress", extra={
                    "model": self.label, "phase": self.line(), "seconds": round(now -
                                                                              self._started)})
            self._draw()
            return not self._cancelled

    def phase_finish(self, name: str) -> None:
        with self._lock:
            self.events += 1
            phase = self._phases.pop(name, None)
            if phase is not None and phase[0] is None and self._tty and self._stream is not None:
                self._stream.write("\r\x1b[2K")
                self._stream.flush()
            self._draw()

    def line(self) -> str:
        """The innermost running phase as ``[#####-----] phase 5/10``; empty when idle."""
        if not self._phases:
            return ""
        name, (_, steps, done) = next(reversed(self._phases.items()))
        filled = min(self._width, self._width * done // steps)
        bar = "#" * filled + "-" * (self._width - filled)
        return f"[{bar}] {name} {min(done, steps)}/{steps}"

    def finish(self) -> None:
        if self._tty and self._stream is not None:
            self._stream.write("\r\x1b[2K")
            self._stream.flush()

    def _draw(self) -> None:
        if not self._tty or self._stream is None:
            return
        elapsed = time.monotonic() - self._started
        text = f"{self.label}: {self.line()} {elapsed:.0f}s"
        self._stream.write("\r\x1b[2K" + text[:200])
        self._stream.flush()


def progress_monitor(trt: Any, progress: BuildProgress) -> Any:
    """A trt.IProgressMonitor forwarding to ``progress``; None where TensorRT has none."""
    base = getattr(trt, "IProgressMonitor", None)
    if base is None:
        return None

    class Monitor(base):  # type: ignore[misc,valid-type]
        def __init__(self) -> None:
            super().__init__()

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            with contextlib.suppress(Exception):  # a display problem must not break a build
                progress.phase_start(phase_name, parent_phase, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            try:
                return progress.step_complete(phase_name, step)
            except Exception:
                return True

        def phase_finish(self, phase_name: str) -> None:
            with contextlib.suppress(Exception):
                progress.phase_finish(phase_name)

    return Monitor()
