"""The audit log (``--audit-log``): one JSON line per control action and per refused call.

Each line names the authenticated identity (never a client-supplied header), the peer address,
the RPC, its target (model or region), the outcome (OK or the status code) and the time. The
file rotates by size (``--audit-log-max-bytes``, ``--audit-log-backups`` kept). Lines are
written on the event loop thread through a buffered handler: a line is a few microseconds.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from pathlib import Path


class AuditLog:
    def __init__(self, path: Path, max_bytes: int, backups: int) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.handlers.RotatingFileHandler(
            path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8")
        handler.setFormatter(logging.Formatter("%(message)s"))
        # A logger of its own, cut off from the root's handlers: audit lines go to the file
        # only, whatever the server's log settings.
        self._logger = logging.Logger("peregrine.audit", logging.INFO)
        self._logger.addHandler(handler)
        self._handler = handler

    def record(self, *, identity: str, source: str, peer: str, rpc: str, target: str,
               outcome: str, detail: str = "") -> None:
        now = time.time()
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now))
            + f".{int(now * 1000) % 1000:03d}Z",
            "identity": identity,
            "auth": source,
            "peer": peer,
            "rpc": rpc,
            "target": target,
            "outcome": outcome,
        }
        if detail:
            line["detail"] = detail
        # json.dumps escapes every control character: one record is always one line.
        self._logger.info(json.dumps(line, ensure_ascii=False))

    def close(self) -> None:
        self._handler.close()
