"""The auth file, token checks, rate-limit buckets and Triton's restricted-protocol specs."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import RateLimited
from server.security.auth_file import identity_stanza, new_token, parse_auth_file
from server.security.authenticator import Authenticator
from server.security.identity import Role
from server.security.ratelimit import RateLimit, RateLimiter, parse_limit, parse_model_limits
from server.security.rules import parse_restrictions


def write_identity(path: Path, name: str, roles: list[str], **extra: object) -> str:
    token, stored = new_token()
    stanza = identity_stanza(name, roles, None, stored, [], None)
    for key, value in extra.items():
        stanza += f"{key} = {value}\n"
    path.write_text((path.read_text() + "\n" if path.exists() else "") + stanza)
    return token


def test_a_token_is_checked_against_its_salted_hash_only(tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    token = write_identity(path, "web", ["infer"])
    assert token not in path.read_text()
    secret = token.partition(".")[2]
    assert secret not in path.read_text()
    authenticator = Authenticator(path)
    identity = authenticator.from_header(f"Bearer {token}")
    assert identity is not None and identity.name == "web"
    assert identity.roles == frozenset({Role.INFER})
    assert authenticator.from_header(f"bearer {token}") is not None  # scheme is caseless
    key_id = token.partition(".")[0]
    for wrong in (f"Bearer {key_id}.x{secret[1:]}", f"Bearer {key_id}", "Bearer ",
                  f"Basic {token}", token, f"Bearer 000000000000.{secret}"):
        assert authenticator.from_header(wrong) is None, wrong


def test_the_auth_file_is_reread_only_when_it_changes_and_a_bad_one_is_ignored(
        tmp_path: Path) -> None:
    path = tmp_path / "auth.toml"
    first = write_identity(path, "first", ["infer"])
    authenticator = Authenticator(path)
    assert not authenticator.refresh()
    second = write_identity(path, "second", ["monitor"])
    assert authenticator.refresh()
    assert authenticator.from_header(f"Bearer {second}") is not None
    path.write_text("not toml [")
    assert not authenticator.refresh()
    assert authenticator.from_header(f"Bearer {first}") is not None


@pytest.mark.parametrize(("text", "words"), [
    ("[[identity]]\nname = 'x'\nroles = ['root']\ntokens = []\n", "roles are"),
    ("[[identity]]\nname = 'x'\nroles = ['infer']\n", "needs tokens or certificate_names"),
    ("[[identity]]\nname = 'x'\nroles = []\ncertificate_names = ['a']\n", "at least one role"),
    ("[[identity]]\nname = 'x'\nroles = ['infer']\ntokens = ['abc']\n", "KEYID:SALT:SHA256"),
    ("[[identity]]\nname = 'x'\nroles = ['infer']\ncertificate_names = ['a']\nrole = 1\n",
     "unknown keys"),
    ("[[identity]]\nname = 'x'\nroles = ['infer']\ncertificate_names = ['a']\n"
     "[[identity]]\nname = 'x'\nroles = ['infer']\ncertificate_names = ['b']\n",
     "appears twice"),
    ("[[identity]]\nname = 'x'\nroles = ['infer']\ncertificate_names = ['a']\nrate = 'fast'\n",
     "'rate' must be a number"),
    ("users = 1\n", "unknown keys"),
])
def test_a_malformed_auth_file_is_one_clear_error(text: str, words: str) -> None:
    with pytest.raises(ValueError, match=words):
        parse_auth_file(text, Path("auth.toml"))


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_a_bucket_admits_its_burst_then_refills_at_its_rate() -> None:
    clock = Clock()
    refused: list[tuple[str, str]] = []
    limiter = RateLimiter(lambda name: RateLimit(2.0, 3) if name == "web" else None,
                          {"m": RateLimit(1.0, 1)}, lambda i, m: refused.append((i, m)), clock)
    for _ in range(3):
        limiter.admit("web")
    with pytest.raises(RateLimited) as raised:
        limiter.admit("web")
    assert raised.value.retry_after_ms == 500
    clock.now += 0.5
    limiter.admit("web")
    for _ in range(100):
        limiter.admit("other")  # no limit of its own
    limiter.admit("other", "m")
    with pytest.raises(RateLimited, match="model 'm'"):
        limiter.admit("other", "m")
    with pytest.raises(RateLimited):
        limiter.admit("other", "m")
    limiter.admit("other", "unlimited")
    assert refused == [("web", ""), ("other", "m"), ("other", "m")]


def test_limits_and_restrictions_parse_or_say_why() -> None:
    assert parse_limit("100") == RateLimit(100.0, 100)
    assert parse_limit("0.5:2") == RateLimit(0.5, 2)
    assert parse_model_limits(("a=10:20", "b=1")) == {"a": RateLimit(10.0, 20),
                                                      "b": RateLimit(1.0, 1)}
    for bad in ("fast", "0", "-1:3", "10:0"):
        with pytest.raises(ValueError):
            parse_limit(bad)
    with pytest.raises(ValueError, match="MODEL=RATE"):
        parse_model_limits(("a",))
    assert parse_restrictions(("model-repository,shared-memory:Admin-Key=s",)) == {
        "model-repository": ("admin-key", "s"), "shared-memory": ("admin-key", "s")}
    with pytest.raises(ValueError, match="unknown group"):
        parse_restrictions(("everything:k=v",))
    with pytest.raises(ValueError, match="GROUPS:KEY=VALUE"):
        parse_restrictions(("inference",))
    with pytest.raises(ValueError, match="twice"):
        parse_restrictions(("inference:a=b", "inference:c=d"))


def test_only_loopback_hosts_skip_the_no_auth_warning() -> None:
    from server.app import _loopback

    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert _loopback(host), host
    for host in ("0.0.0.0", "::", "10.0.0.5", "myhost.example"):
        assert not _loopback(host), host
