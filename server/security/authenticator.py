"""Who is calling: a bearer token in the call's metadata, else a verified client certificate.

Verified tokens are remembered (the header value -> identity, bounded, dropped when the file
changes), so a connection's later calls cost a dictionary lookup. The auth file is re-read when
it changes (``refresh``, driven by the guard's watcher); a file that no longer parses keeps the
previous identities and logs why.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

from server.security.auth_file import read_auth_file
from server.security.identity import Identity
from server.security.ratelimit import RateLimit

log = logging.getLogger(__name__)

BEARER = "bearer "
#: Verified header values remembered at most (cleared when full: a flood of valid tokens
#: costs a re-hash each, never memory).
CACHE_LIMIT = 4096
#: auth_context keys naming a verified client certificate.
_CERTIFICATE_KEYS = ("x509_common_name", "x509_subject_alternative_name")


class Authenticator:
    def __init__(self, path: Path) -> None:
        self._path = path
        self._table = read_auth_file(path)
        self._stamp = _stamp(path)
        self._verified: dict[str, Identity] = {}
        #: Bumped on every successful reload (others reset state derived from identities).
        self.generation = 0

    @property
    def identities(self) -> Sequence[Identity]:
        return self._table.identities

    @property
    def uses_certificates(self) -> bool:
        return bool(self._table.certificates)

    def limit_of(self, identity: str) -> RateLimit | None:
        return self._table.limits.get(identity)

    def from_header(self, value: str) -> Identity | None:
        """The identity of an ``authorization`` header value, or None."""
        known = self._verified.get(value)
        if known is not None:
            return known
        if value[:len(BEARER)].lower() != BEARER:
            return None
        key_id, dot, secret = value[len(BEARER):].strip().partition(".")
        entry = self._table.tokens.get(key_id) if dot else None
        if entry is None:
            return None
        stored, identity = entry
        if not stored.matches(secret):
            return None
        if len(self._verified) >= CACHE_LIMIT:
            self._verified.clear()
        self._verified[value] = identity
        return identity

    def from_certificate(self, auth_context: dict[str, list[bytes]]) -> Identity | None:
        """The identity of a verified client certificate (its CN, else a SAN), or None.

        gRPC fills the x509 keys only for a certificate that passed verification against
        --grpc-root-cert, so they can be trusted as they are.
        """
        certificates = self._table.certificates
        for key in _CERTIFICATE_KEYS:
            for raw in auth_context.get(key, ()):
                identity = certificates.get(raw.decode("utf-8", "replace"))
                if identity is not None:
                    return identity
        return None

    def refresh(self) -> bool:
        """Re-read the file if it changed; True when new identities took effect."""
        stamp = _stamp(self._path)
        if stamp == self._stamp:
            return False
        self._stamp = stamp
        try:
            table = read_auth_file(self._path)
        except ValueError as exc:
            log.error("auth file not reloaded; the previous identities stay in force",
                      extra={"error": str(exc)})
            return False
        self._table = table
        self._verified = {}
        self.generation += 1
        log.info("auth file reloaded", extra={"identities": len(table.identities)})
        return True


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        status = os.stat(path)
    except OSError:
        return None
    return status.st_mtime_ns, status.st_size, status.st_ino


