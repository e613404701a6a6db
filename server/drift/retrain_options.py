"""The ``--retrain-*`` server options (the continuous-training hook, server/drift/retrain.py).

Kept apart from the hook so the settings can check them without drift's dependencies.
"""

from __future__ import annotations

import shlex
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RetrainSettings:
    """``--retrain-*`` (server/settings.py); ``enabled`` when a command or a URL is set."""

    command: str = ""
    url: str = ""
    cooldown_s: float = 3600.0
    timeout_s: float = 300.0
    #: Also fire after this many newly sampled rows (0: never).
    every_rows: int = 0
    #: Also fire after this many seconds since the last run, or since monitoring began (0: never).
    every_s: float = 0.0

    @property
    def enabled(self) -> bool:
        return bool(self.command or self.url)

    def check(self) -> None:
        """Raise ValueError naming the option at fault."""
        if self.command and self.url:
            raise ValueError("retrain_command and retrain_url exclude each other")
        if self.command:
            try:
                if not shlex.split(self.command):
                    raise ValueError("is empty")
            except ValueError as exc:
                raise ValueError(f"retrain_command: {exc}") from None
        if self.url:
            check_url(self.url)
        for name in ("cooldown_s", "timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"retrain_{name.replace('_s', '_secs')} must be positive")
        if self.every_rows < 0 or not self.every_s >= 0:
            raise ValueError("retrain_every_rows and retrain_every_secs must not be negative")
        if (self.every_rows or self.every_s) and not self.enabled:
            raise ValueError("retrain_every_rows and retrain_every_secs need retrain_command "
                             "or retrain_url")


def check_url(url: str) -> None:
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"retrain_url must be an http:// or https:// URL with a host, "
                         f"got {url!r}")
