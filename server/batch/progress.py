"""The progress bar of ``peregrine batch`` on stderr: tqdm when it is installed, else one line
rewritten in place (a terminal) or printed every few seconds (a log)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int, done: int, label: str, stream: TextIO | None = None) -> None:
        self._stream = stream or sys.stderr
        self._total = total
        self._done = done
        self._label = label
        self._start = time.perf_counter()
        self._shown = 0.0
        self._bar: Any = None
        try:
            from tqdm import tqdm
        except ImportError:
            pass
        else:
            self._bar = tqdm(total=total, initial=done, unit="rows", desc=label,
                             file=self._stream, dynamic_ncols=True)

    def update(self, rows: int) -> None:
        self._done += rows
        if self._bar is not None:
            self._bar.update(rows)
            return
        now = time.perf_counter()
        tty = self._stream.isatty()
        if now - self._shown >= (0.2 if tty else 5.0):
            self._shown = now
            end = "\r" if tty else "\n"
            self._stream.write(f"{self._label}: {self._done}/{self._total} rows{end}")
            self._stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        elif self._stream.isatty():
            self._stream.write("\n")
