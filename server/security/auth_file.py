"""The auth file (``--auth-file``): identities, how each proves itself, and what it may do.

A TOML file of ``[[identity]]`` tables::

    [[identity]]
    name = "web"                      # who, in the audit log and the metrics
    roles = ["infer"]                 # infer, monitor, admin
    models = ["mlp_classifier"]       # optional: only these models
    tokens = ["k3f9...:<salt>:<sha256>"]   # from `peregrine auth add`, never the token itself
    certificate_names = ["web.internal"]   # or: a verified client certificate's CN or SAN
    rate = 200.0                      # optional: requests per second ...
    burst = 400                       # ... and burst (token bucket)

A token is ``<key id>.<secret>``: the key id picks the entry, the secret is checked against
its salted SHA-256 in constant time. The secret is 32 random bytes, so a fast hash is enough:
there is nothing to guess that a slow one would protect.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.security.identity import Identity, Role
from server.security.ratelimit import RateLimit


class AuthFileError(ValueError):
    """The auth file cannot be read or is malformed (the server does not start)."""


_KEYS = frozenset({"name", "roles", "models", "tokens", "certificate_names", "rate", "burst"})


@dataclass(frozen=True, slots=True)
class StoredToken:
    key_id: str
    salt: bytes
    digest: bytes

    def matches(self, secret: str) -> bool:
        return hmac.compare_digest(_digest(self.salt, secret), self.digest)

    def __str__(self) -> str:
        return f"{self.key_id}:{self.salt.hex()}:{self.digest.hex()}"


@dataclass(frozen=True, slots=True)
class AuthTable:
    """A parsed auth file: identities by token key id and by certificate name."""

    identities: tuple[Identity, ...]
    tokens: dict[str, tuple[StoredToken, Identity]]
    certificates: dict[str, Identity]
    limits: dict[str, RateLimit]


def _digest(salt: bytes, secret: str) -> bytes:
    return hashlib.sha256(salt + secret.encode("utf-8", "surrogatepass")).digest()


def new_token() -> tuple[str, StoredToken]:
    """A fresh token (given to the client once) and what the auth file stores of it."""
    key_id = secrets.token_hex(6)
    secret = secrets.token_urlsafe(32)
    salt = secrets.token_bytes(16)
    return f"{key_id}.{secret}", StoredToken(key_id, salt, _digest(salt, secret))


def _stored_token(text: Any, where: str) -> StoredToken:
    parts = text.split(":") if isinstance(text, str) else []
    try:
        key_id, salt, digest = parts
        stored = StoredToken(key_id, bytes.fromhex(salt), bytes.fromhex(digest))
    except ValueError:
        raise ValueError(f"{where}: a token entry is KEYID:SALT:SHA256 (hex), as "
                         "`peregrine auth add` writes it") from None
    if not key_id or len(stored.digest) != 32 or len(stored.salt) < 8:
        raise ValueError(f"{where}: malformed token entry")
    return stored


def _strings(entry: dict[str, Any], key: str, where: str) -> list[str]:
    value = entry.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{where}: '{key}' must be a list of non-empty strings")
    return list(value)


def _identity(entry: Any, index: int) -> tuple[Identity, list[StoredToken], list[str],
                                               RateLimit | None]:
    where = f"identity #{index + 1}"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: must be a table")
    unknown = set(entry) - _KEYS
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)}")
    name = entry.get("name")
    if not isinstance(name, str) or not name or not name.isprintable() or len(name) > 128:
        raise ValueError(f"{where}: 'name' must be a printable string of 1 to 128 characters")
    where = f"identity '{name}'"
    try:
        roles = frozenset(Role(r) for r in _strings(entry, "roles", where))
    except ValueError as exc:
        raise ValueError(f"{where}: roles are infer, monitor and admin ({exc})") from None
    if not roles:
        raise ValueError(f"{where}: needs at least one role")
    models = frozenset(_strings(entry, "models", where)) if "models" in entry else None
    raw_tokens = entry.get("tokens", [])
    if not isinstance(raw_tokens, list):
        raise ValueError(f"{where}: 'tokens' must be a list")
    tokens = [_stored_token(t, where) for t in raw_tokens]
    names = _strings(entry, "certificate_names", where)
    if not tokens and not names:
        raise ValueError(f"{where}: needs tokens or certificate_names")
    limit = None
    if "rate" in entry or "burst" in entry:
        rate = entry.get("rate")
        if not isinstance(rate, int | float) or isinstance(rate, bool):
            raise ValueError(f"{where}: 'rate' must be a number (requests per second)")
        burst = entry.get("burst", max(1, int(rate)))
        if not isinstance(burst, int) or isinstance(burst, bool):
            raise ValueError(f"{where}: 'burst' must be an integer")
        limit = RateLimit(float(rate), burst)
    source = "token" if tokens else "certificate"
    return Identity(name, roles, models, source), tokens, names, limit


def parse_auth_file(text: str, path: Path) -> AuthTable:
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise AuthFileError(f"auth file {path}: {exc}") from None
    unknown = set(document) - {"identity"}
    if unknown:
        raise AuthFileError(f"auth file {path}: unknown keys {sorted(unknown)} (expected "
                         "[[identity]] tables)")
    entries = document.get("identity", [])
    if not isinstance(entries, list):
        raise AuthFileError(f"auth file {path}: 'identity' must be an array of tables")
    identities: list[Identity] = []
    tokens: dict[str, tuple[StoredToken, Identity]] = {}
    certificates: dict[str, Identity] = {}
    limits: dict[str, RateLimit] = {}
    for index, entry in enumerate(entries):
        try:
            identity, stored, names, limit = _identity(entry, index)
        except ValueError as exc:
            raise AuthFileError(f"auth file {path}: {exc}") from None
        if any(i.name == identity.name for i in identities):
            raise AuthFileError(f"auth file {path}: identity '{identity.name}' appears twice")
        identities.append(identity)
        for token in stored:
            if token.key_id in tokens:
                raise AuthFileError(f"auth file {path}: token key id '{token.key_id}' appears "
                                 "twice")
            tokens[token.key_id] = (token, identity)
        for name in names:
            if name in certificates:
                raise AuthFileError(f"auth file {path}: certificate name '{name}' belongs to "
                                 "two identities")
            certificates[name] = identity
        if limit is not None:
            limits[identity.name] = limit
    return AuthTable(tuple(identities), tokens, certificates, limits)


def read_auth_file(path: Path) -> AuthTable:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise AuthFileError(f"auth file {path}: {exc.strerror or exc}") from None
    return parse_auth_file(text, path)


def identity_stanza(name: str, roles: list[str], models: list[str] | None,
                    token: StoredToken | None, certificate_names: list[str],
                    limit: RateLimit | None) -> str:
    """The TOML an operator appends to the auth file for one identity."""
    lines = ["[[identity]]", f"name = {_toml_string(name)}",
             f"roles = [{', '.join(_toml_string(r) for r in roles)}]"]
    if models is not None:
        lines.append(f"models = [{', '.join(_toml_string(m) for m in models)}]")
    if token is not None:
        lines.append(f'tokens = ["{token}"]')
    if certificate_names:
        lines.append("certificate_names = "
                     f"[{', '.join(_toml_string(n) for n in certificate_names)}]")
    if limit is not None:
        lines += [f"rate = {limit.rate:g}", f"burst = {limit.burst}"]
    return "\n".join(lines) + "\n"


def _toml_string(text: str) -> str:
    """A TOML basic string (JSON's escapes are TOML's)."""
    return json.dumps(text, ensure_ascii=False)
