"""What reaches a log line and what reaches a client: log values escaped (server/logs.py), and
an unexpected error answered with a correlation id only (server/frontend/status.py)."""

from __future__ import annotations

import io
import json
import logging
import re
import sys

import grpc
import pytest

from server.errors import BackendError, InvalidInput
from server.frontend.status import status_of
from server.logs import JsonFormatter, LogSettings, TextFormatter, configure_logging

FORGED = "abc\ninfo fake line"


def record(message: str = "request failed", **fields: object) -> logging.LogRecord:
    entry = logging.LogRecord("server.test", logging.ERROR, __file__, 1, message, None, None)
    for key, value in fields.items():
        setattr(entry, key, value)
    return entry


def test_text_values_cannot_end_the_line_or_reach_the_terminal() -> None:
    line = TextFormatter().format(record(f"msg {FORGED}", request_id=FORGED,
                                         model="m\x1b[2J", plain="a=b", fine="resnet"))
    assert "\n" not in line and "\x1b" not in line, line
    assert 'request_id="abc\\ninfo fake line"' in line
    assert 'model="m\\u001b[2J"' in line and 'plain="a=b"' in line and " fine=resnet" in line
    assert '"msg abc\\ninfo fake line"' in line


def test_json_values_cannot_end_the_line() -> None:
    line = JsonFormatter().format(record(FORGED, request_id=FORGED + "\x1b"))
    assert "\n" not in line and "\x1b" not in line
    assert json.loads(line)["request_id"] == FORGED + "\x1b"
    assert json.loads(line)["event"] == FORGED


def test_a_traceback_stays_indented_under_its_line() -> None:
    try:
        raise ValueError(f"bad {FORGED}\x1b[31m")
    except ValueError:
        entry = record(request_id="r1")
        entry.exc_info = sys.exc_info()
    first, *rest = TextFormatter().format(entry).split("\n")
    assert first.endswith("request_id=r1")
    assert rest and all(line.startswith("    ") for line in rest), rest
    assert "\x1b" not in "".join(rest)


def test_an_unexpected_error_answers_a_correlation_id_only(
    caplog: pytest.LogCaptureFixture,
) -> None:
    exc = RuntimeError("cannot open /srv/models/secret/1/model.onnx")
    code, message = status_of(exc, "ModelConfig", "r1")
    assert code is grpc.StatusCode.INTERNAL
    matched = re.fullmatch(r"internal error \(correlation id ([0-9a-f]{16})\)", message)
    assert matched, message
    [logged] = caplog.records
    assert logged.correlation_id == matched.group(1)  # type: ignore[attr-defined]
    assert "/srv/models/secret" in logged.error  # type: ignore[attr-defined]
    assert logged.exc_info is not None and logged.request_id == "r1"  # type: ignore[attr-defined]
    assert status_of(RuntimeError("x"), "ModelConfig")[1] != message  # one id per error


def test_typed_errors_keep_their_message(caplog: pytest.LogCaptureFixture) -> None:
    assert status_of(InvalidInput("input 'x' has shape [2]"), "ModelInfer") == (
        grpc.StatusCode.INVALID_ARGUMENT, "input 'x' has shape [2]")
    assert not caplog.records
    assert status_of(BackendError("model 'm' version 1 failed"), "ModelInfer")[1] == \
        "model 'm' version 1 failed"
    assert [r.getMessage() for r in caplog.records] == ["request failed"]


def test_log_settings_apply_all_or_nothing_and_close_puts_the_logging_back() -> None:
    root = logging.getLogger()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TextFormatter())
    level = root.level
    root.addHandler(handler)
    settings = LogSettings("warning", "text")
    try:
        assert settings.current()["log_info"] is False
        with pytest.raises(ValueError, match="log_file cannot be set"):
            settings.update({"log_info": True, "log_file": "/etc/passwd"})
        assert settings.current()["log_info"] is False  # nothing applied
        settings.update({"log_format": "json", "log_error": False})
        assert isinstance(handler.formatter, JsonFormatter)
        record = logging.LogRecord("x", logging.ERROR, "", 0, "boom", None, None)
        assert not handler.filter(record)
        settings.update({"log_error": None})  # back to how it started
        assert handler.filter(record)
    finally:
        settings.close()
        root.removeHandler(handler)
    assert isinstance(handler.formatter, TextFormatter) and not handler.filters
    assert root.level == level


def test_the_log_follows_stderr_when_the_host_swaps_and_closes_it(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A record written after the stream that was stderr at configuration closed goes to
    the stderr of the moment (pytest's per-test capture does this to a module's server)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        first = io.StringIO()
        monkeypatch.setattr(sys, "stderr", first)
        configure_logging("info", "text")
        logging.getLogger("peregrine.test").info("before the swap")
        assert "before the swap" in first.getvalue()
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("peregrine.test").info("after the swap")
        [line] = second.getvalue().splitlines()
        assert line.endswith('peregrine.test "after the swap"'), line
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
