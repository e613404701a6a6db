"""Structured logging: one line per event, key=value text or JSON.

Values come from clients too (request ids, model names, messages quoting them), so no value
may end a line or reach the terminal: JSON escapes every control character; text quotes a
value that is not printable or holds a space, a quote or '=' (a JSON string: everything but
printable ASCII escaped) and indents the lines of a traceback, so none passes for a line of
its own.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any, TextIO

_STANDARD = frozenset(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {
    "message", "asctime", "taskName",
}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in vars(record).items() if k not in _STANDARD}


def _timestamp(record: logging.LogRecord) -> str:
    moment = datetime.fromtimestamp(record.created, tz=UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{int(record.msecs):03d}Z"


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": record.getMessage(),
        }
        line.update(_fields(record))
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def _text_value(value: object) -> str:
    """A key=value value: bare when it is plain, else a JSON string (escapes included)."""
    text = str(value)
    if text and text.isprintable() and not any(c in text for c in ' "='):
        return text
    return json.dumps(text)


def _indented(traceback: str) -> str:
    """Every line of a traceback indented, control characters escaped: an exception message
    holding a newline (or a terminal sequence) stays inside the entry it belongs to."""
    lines = []
    for line in traceback.splitlines():
        escaped = line if line.isprintable() else json.dumps(line)[1:-1]
        lines.append("    " + escaped)
    return "\n".join(lines)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        parts = [
            _timestamp(record),
            record.levelname.lower(),
            record.name,
            json.dumps(record.getMessage()),
        ]
        parts.extend(f"{key}={_text_value(value)}" for key, value in _fields(record).items())
        line = " ".join(parts)
        if record.exc_info:
            line += "\n" + _indented(self.formatException(record.exc_info))
        return line


class _CurrentStderr(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever ``sys.stderr`` is when a record comes, as logging's last-resort
    handler does, not the stream it was when the handler was made: where a host swaps
    ``sys.stderr`` (pytest's per-test capture, an application embedding the server) and
    closes the old one, a record from one of the server's threads goes to the current
    stream, not to a closed one."""

    @property
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _stream: TextIO) -> None:
        """StreamHandler's constructor sets it; the property always reads sys.stderr."""


def configure_logging(level: str, fmt: str) -> None:
    handler = _CurrentStderr()
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.getLogger("grpc").setLevel(logging.WARNING)


#: What LogSettings reports and takes (Triton's keys); log_file is reported, never taken.
LOG_FORMATS = ("text", "json")
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


class _Toggles(logging.Filter):
    """Drops the records of the kinds switched off (info, warning, error, verbose)."""

    def __init__(self, settings: LogSettings) -> None:
        super().__init__()
        self._settings = settings

    def filter(self, record: logging.LogRecord) -> bool:
        s = self._settings
        if record.levelno < logging.INFO:
            return s.verbose_level > 0
        if record.levelno < logging.WARNING:
            return s.info
        if record.levelno < logging.ERROR:
            return s.warning
        return s.error


class LogSettings:
    """The server's logging as Triton's LogSettings RPC reads and changes it.

    ``log_info``, ``log_warning``, ``log_error`` switch those records on and off, and
    ``log_verbose_level`` above 0 lets debug records through: the root logger's level and a
    filter on its handlers apply them for real. ``log_format`` is ``text`` or ``json``
    (Peregrine's two formats, applied to the handlers that use one of them). ``log_file``
    is always "" (the server logs to stderr) and cannot be set: a client must never name a
    file the server would write. Changes hold until the server stops (``close`` restores the
    logging as it was) and apply to this process only.
    """

    def __init__(self, level: str, fmt: str) -> None:
        start = _LEVELS.get(level.lower(), logging.INFO)
        self.verbose_level = 1 if start <= logging.DEBUG else 0
        self.info = start <= logging.INFO
        self.warning = start <= logging.WARNING
        self.error = True
        self.format = fmt
        self._start = self.current()
        self._toggles = _Toggles(self)
        self._root_level: int | None = None
        #: The handlers given the filter, with the formatter each had then.
        self._handlers: dict[logging.Handler, logging.Formatter | None] = {}

    def current(self) -> dict[str, bool | int | str]:
        return {"log_file": "", "log_info": self.info, "log_warning": self.warning,
                "log_error": self.error, "log_verbose_level": self.verbose_level,
                "log_format": self.format}

    def update(self, changes: dict[str, bool | int | str | None]) -> dict[str, bool | int | str]:
        """Apply ``changes`` (a value of None: back to how the server started) all or none;
        ValueError names the first bad one. Returns the settings now."""
        wanted = self.current()
        for key, value in changes.items():
            if key not in wanted:
                raise ValueError(f"unknown log setting '{key}'; the settings are "
                                 f"{sorted(wanted)}")
            wanted[key] = self._start[key] if value is None else _checked(key, value)
        self.info, self.warning, self.error = (bool(wanted["log_info"]),
                                               bool(wanted["log_warning"]),
                                               bool(wanted["log_error"]))
        self.verbose_level = int(wanted["log_verbose_level"])
        self.format = str(wanted["log_format"])
        self._apply()
        return self.current()

    def _apply(self) -> None:
        root = logging.getLogger()
        if self._root_level is None:
            self._root_level = root.level
        root.setLevel(logging.DEBUG if self.verbose_level > 0 else logging.INFO)
        formatter: logging.Formatter = (JsonFormatter() if self.format == "json"
                                        else TextFormatter())
        for handler in root.handlers:
            if handler not in self._handlers:
                self._handlers[handler] = handler.formatter
                handler.addFilter(self._toggles)
            if isinstance(handler.formatter, (JsonFormatter, TextFormatter)):
                handler.setFormatter(formatter)

    def close(self) -> None:
        """Put the logging back as it was before the first change."""
        for handler, formatter in self._handlers.items():
            handler.removeFilter(self._toggles)
            handler.setFormatter(formatter)
        self._handlers.clear()
        if self._root_level is not None:
            logging.getLogger().setLevel(self._root_level)
            self._root_level = None


def _checked(key: str, value: bool | int | str) -> bool | int | str:
    if key == "log_file":
        if value != "":
            raise ValueError("log_file cannot be set over the protocol: the server logs to "
                             "stderr, which its supervisor (systemd, Kubernetes) collects")
        return value
    if key == "log_format":
        if value not in LOG_FORMATS:
            raise ValueError(f"log_format {value!r} is not one of {list(LOG_FORMATS)}")
        return value
    if key == "log_verbose_level":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"log_verbose_level must be an unsigned integer, got {value!r}")
        return value
    if not isinstance(value, bool):
        raise ValueError(f"{key} must be a boolean, got {value!r}")
    return value
