"""The live progress line on stderr, rewritten in place (only on a terminal unless forced)."""

from __future__ import annotations

import sys
import time
from typing import TextIO


class ProgressLine:
    def __init__(self, enabled: bool | None = None, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self.enabled = self._stream.isatty() if enabled is None else enabled
        self._width = 0
        self._last_ok = 0
        self._last_at = time.monotonic()

    def reset(self) -> None:
        self._last_ok = 0
        self._last_at = time.monotonic()

    def update(self, label: str, phase: str, ok: int, errors: int) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        rate = (ok - self._last_ok) / max(now - self._last_at, 1e-6)
        self._last_ok, self._last_at = ok, now
        text = f"{label}  {phase}  ok {ok}  errors {errors}  {rate:,.0f}/s"
        self._stream.write("\r" + text.ljust(self._width))
        self._stream.flush()
        self._width = len(text)

    def clear(self) -> None:
        if self.enabled and self._width:
            self._stream.write("\r" + " " * self._width + "\r")
            self._stream.flush()
            self._width = 0
