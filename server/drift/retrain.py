"""The continuous-training hook: drift (or volume, or time) -> an operator's retrain command.

When a model version's latest fixed window is at alert, or (optionally) a configured number of
new rows has been sampled or time has passed since the hook last fired, the drift analyser
thread asks :meth:`RetrainHook.consider`; at most once per cool-down per model version it hands
a job to the hook's own worker thread, which runs the configured command (the JSON payload on
its stdin and in a file named by ``PEREGRINE_RETRAIN_PAYLOAD``, killed with its process group
after the timeout) or POSTs the payload to the configured http(s) URL (no proxy, no redirect,
with a timeout). The payload names the model, the version, the window's figures and where the
sample store keeps the rows (its directory and window files), so a script can read them.

Each run is logged (exit status and output tail), written to the audit log and counted by
outcome. Nothing here runs on the event loop, and a failing, hanging or refused hook only
shows in those records: serving never waits for it. The hook is operator configuration
(server flags), never a model config parameter: a model's config may come from whoever
publishes models, and a command is code run by the server.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import queue
import shlex
import signal
import subprocess
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from server.drift.detect import Level, WindowReport
from server.drift.retrain_options import RetrainSettings
from server.drift.store import window_files

log = logging.getLogger(__name__)

#: Jobs waiting for the worker; past it a due run is dropped (and counted).
MAX_PENDING = 8
#: Characters of a command's output (or a URL's answer) kept for the log and the payload.
TAIL_CHARS = 2000

OK = "ok"
FAILED = "failed"
TIMEOUT = "timeout"
ERROR = "error"
DROPPED = "dropped"
#: Every outcome a run is counted under.
OUTCOMES = (OK, FAILED, TIMEOUT, ERROR, DROPPED)

#: Why a run was due.
ALERT = "drift_alert"
ROWS = "rows"
ELAPSED = "elapsed"


@dataclass(slots=True)
class _Mark:
    """When a version's hook last fired (or its monitoring began), and its rows then."""

    fired: float
    since: float
    rows: int


@dataclass(frozen=True, slots=True)
class Run:
    model: str
    version: str
    reason: str
    outcome: str
    #: "exit 0", "HTTP 200", "killed after 5 s", the error...
    detail: str
    tail: str


class RetrainHook:
    """Decides on the analyser thread, acts on its own worker thread."""

    def __init__(self, settings: RetrainSettings, repository: Path,
                 record: Callable[[Run], None]) -> None:
        self._settings = settings
        self._repository = repository
        self._record = record
        self._marks: dict[tuple[str, str], _Mark] = {}
        self._jobs: queue.Queue[dict[str, Any] | None] = queue.Queue(MAX_PENDING)
        self._running: subprocess.Popen[bytes] | None = None
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._work, name="retrain-hook", daemon=True)
        self._worker.start()

    # -- the decision (the analyser thread) ------------------------------------------------------

    def consider(self, report: WindowReport, rows_seen: int, store: Path | None, store_format: str,
                 now: float) -> str | None:
        """Queue a run for this version when one is due and its cool-down has passed; returns
        the reason, or None."""
        settings = self._settings
        key = (report.model, report.version)
        mark = self._marks.get(key)
        if mark is None:
            mark = self._marks[key] = _Mark(-math.inf, now, rows_seen)
        if now - mark.fired < settings.cooldown_s:
            return None
        if report.level >= Level.ALERT:
            reason = ALERT
        elif settings.every_rows and rows_seen - mark.rows >= settings.every_rows:
            reason = ROWS
        elif settings.every_s and now - mark.since >= settings.every_s:
            reason = ELAPSED
        else:
            return None
        mark.fired = mark.since = now
        mark.rows = rows_seen
        payload = self.payload(report, reason, rows_seen, store, store_format)
        try:
            self._jobs.put_nowait(payload)
        except queue.Full:
            self._finish(Run(report.model, report.version, reason, DROPPED,
                             f"{MAX_PENDING} runs already waiting", ""))
        return reason

    def forget(self, model: str, version: str) -> None:
        self._marks.pop((model, version), None)

    def payload(self, report: WindowReport, reason: str, rows_seen: int, store: Path | None,
                store_format: str) -> dict[str, Any]:
        files = [p.name for p in window_files(store)] if store is not None else []
        return {
            "model": report.model,
            "version": report.version,
            "reason": reason,
            "fired_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "repository": str(self._repository.resolve()),
            "rows_seen": rows_seen,
            "window": {
                "kind": report.window, "sequence": report.sequence, "rows": report.rows,
                "score": _finite(report.score), "level": report.level.label,
                "features": [{k: _finite(v) for k, v in f.as_dict().items()}
                             for f in report.worst()],
            },
            "store": None if store is None else {
                "directory": str(store.resolve()), "format": store_format, "windows": files,
            },
        }

    # -- the action (the worker thread) ----------------------------------------------------------

    def _work(self) -> None:
        while (payload := self._jobs.get()) is not None:
            model, version, reason = payload["model"], payload["version"], payload["reason"]
            try:
                outcome, detail, tail = (self._run_command(payload) if self._settings.command
                                         else self._post(payload))
            except Exception as exc:  # whatever happens, the worker goes on
                outcome, detail, tail = ERROR, repr(exc), ""
            self._finish(Run(model, version, reason, outcome, detail, tail))

    def _run_command(self, payload: dict[str, Any]) -> tuple[str, str, str]:
        settings = self._settings
        body = json.dumps(payload).encode()
        with tempfile.NamedTemporaryFile(prefix="peregrine-retrain-", suffix=".json") as data, \
                tempfile.TemporaryFile() as output:
            data.write(body)
            data.flush()
            data.seek(0)
            env = {**os.environ, "PEREGRINE_RETRAIN_PAYLOAD": data.name,
                   "PEREGRINE_RETRAIN_MODEL": payload["model"],
                   "PEREGRINE_RETRAIN_VERSION": payload["version"]}
            try:
                process = subprocess.Popen(shlex.split(settings.command), stdin=data,
                                           stdout=output, stderr=subprocess.STDOUT, env=env,
                                           start_new_session=True)
            except OSError as exc:
                return ERROR, f"cannot start: {exc}", ""
            self._running = process
            try:
                status = process.wait(settings.timeout_s)
                outcome, detail = (OK if status == 0 else FAILED), f"exit {status}"
            except subprocess.TimeoutExpired:
                _kill_group(process)
                outcome, detail = TIMEOUT, f"killed after {settings.timeout_s:g} s"
            finally:
                self._running = None
            if self._closed.is_set() and outcome != OK:
                detail += " (the server stopped)"
            return outcome, detail, _tail(output)

    def _post(self, payload: dict[str, Any]) -> tuple[str, str, str]:
        request = urllib.request.Request(
            self._settings.url, data=json.dumps(payload).encode(), method="POST",
            headers={"Content-Type": "application/json"})
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())
        try:
            with opener.open(request, timeout=self._settings.timeout_s) as answer:
                text = answer.read(TAIL_CHARS).decode("utf-8", "replace")
                return OK, f"HTTP {answer.status}", text
        except urllib.error.HTTPError as exc:
            text = exc.read(TAIL_CHARS).decode("utf-8", "replace")
            return FAILED, f"HTTP {exc.code}", text
        except TimeoutError:
            return TIMEOUT, f"no answer in {self._settings.timeout_s:g} s", ""
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            if isinstance(reason, TimeoutError):
                return TIMEOUT, f"no answer in {self._settings.timeout_s:g} s", ""
            return ERROR, str(reason), ""

    def _finish(self, run: Run) -> None:
        level = logging.INFO if run.outcome == OK else logging.WARNING
        log.log(level, "retrain hook ran", extra={
            "model": run.model, "version": run.version, "reason": run.reason,
            "outcome": run.outcome, "detail": run.detail, "output_tail": run.tail,
        })
        try:
            self._record(run)
        except Exception as exc:  # the audit file or the metric must not stop the worker
            log.exception("retrain hook could not be recorded", extra={"error": repr(exc)})

    def close(self) -> None:
        """Stop the worker: waiting jobs are dropped, a running command is killed."""
        self._closed.set()
        with contextlib.suppress(queue.Empty):
            while True:
                self._jobs.get_nowait()
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        running = self._running
        if running is not None:
            _kill_group(running)
        self._worker.join(timeout=5.0)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer (counted as failed), never followed elsewhere."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    """Kill the command and whatever it started (its own session), then reap it."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(5.0)


def _tail(output: Any) -> str:
    size = output.seek(0, os.SEEK_END)
    output.seek(max(0, size - TAIL_CHARS))
    return str(output.read().decode("utf-8", "replace"))


def _finite(value: Any) -> Any:
    """NaN and infinities as null: the payload is strict JSON."""
    return None if isinstance(value, float) and not math.isfinite(value) else value

