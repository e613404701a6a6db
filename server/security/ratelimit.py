"""Token-bucket rate limits per identity and per model.

A bucket holds up to ``burst`` tokens and gains ``rate`` per second; a request takes one or is
refused at once with the time until the next token (RESOURCE_EXHAUSTED, the delay in trailing
metadata). Buckets live on the event loop thread (no lock); one per identity named in the auth
file (plus the anonymous caller) and one per limited model, so their number is bounded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from server.errors import RateLimited


@dataclass(frozen=True, slots=True)
class RateLimit:
    rate: float
    burst: int

    def __post_init__(self) -> None:
        if not self.rate > 0:
            raise ValueError(f"a rate limit needs a positive rate, got {self.rate}")
        if self.burst < 1:
            raise ValueError(f"a rate limit needs a burst of at least 1, got {self.burst}")

    def __str__(self) -> str:
        return f"{self.rate:g}/s, burst {self.burst}"


def parse_limit(text: str) -> RateLimit:
    """RATE[:BURST]; the burst defaults to max(1, RATE) (one second's worth)."""
    rate_text, _, burst_text = text.strip().partition(":")
    try:
        rate = float(rate_text)
        burst = int(burst_text) if burst_text else max(1, int(rate))
    except ValueError:
        raise ValueError(f"a rate limit is RATE[:BURST], e.g. 100:200, got '{text}'") from None
    return RateLimit(rate, burst)


def parse_model_limits(items: tuple[str, ...]) -> dict[str, RateLimit]:
    """MODEL=RATE[:BURST] items (--model-rate-limit)."""
    limits: dict[str, RateLimit] = {}
    for item in items:
        model, sep, limit = item.partition("=")
        if not sep or not model.strip():
            raise ValueError(f"a model rate limit is MODEL=RATE[:BURST], got '{item}'")
        limits[model.strip()] = parse_limit(limit)
    return limits


class TokenBucket:
    __slots__ = ("_stamp", "_tokens", "limit")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.limit = limit
        self._tokens = float(limit.burst)
        self._stamp = now

    def take(self, now: float) -> float:
        """Take a token: 0.0 when admitted, else the seconds until one is available."""
        limit = self.limit
        tokens = min(float(limit.burst), self._tokens + (now - self._stamp) * limit.rate)
        self._stamp = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            return 0.0
        self._tokens = tokens
        return (1.0 - tokens) / limit.rate


class RateLimiter:
    """Admits a request of an identity to a model, or raises RateLimited.

    ``identity_limit`` gives an identity's limit (its own from the auth file, else the
    server's default; None: unlimited). ``refused`` counts a refusal (the metric).
    """

    def __init__(
        self,
        identity_limit: Callable[[str], RateLimit | None],
        model_limits: Mapping[str, RateLimit],
        refused: Callable[[str, str], None],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._identity_limit = identity_limit
        self._model_limits = dict(model_limits)
        self._refused = refused
        self._clock = clock
        #: None for an identity without a limit (looked up once).
        self._identities: dict[str, TokenBucket | None] = {}
        self._models: dict[str, TokenBucket] = {}

    @property
    def limits_models(self) -> bool:
        return bool(self._model_limits)

    def reset_identities(self) -> None:
        """The identities changed (auth file reloaded): start their buckets afresh."""
        self._identities.clear()

    def admit(self, identity: str, model: str = "") -> None:
        now = self._clock()
        try:
            bucket = self._identities[identity]
        except KeyError:
            limit = self._identity_limit(identity)
            bucket = self._identities[identity] = (
                TokenBucket(limit, now) if limit is not None else None)
        if bucket is not None and (wait := bucket.take(now)):
            self._refuse(identity, model, f"identity '{identity}'", bucket.limit, wait)
        if model and (model_bucket := self._model_bucket(model, now)) is not None \
                and (wait := model_bucket.take(now)):
            self._refuse(identity, model, f"model '{model}'", model_bucket.limit, wait)

    def _model_bucket(self, model: str, now: float) -> TokenBucket | None:
        bucket = self._models.get(model)
        if bucket is None:
            limit = self._model_limits.get(model)
            if limit is None:
                return None
            bucket = self._models[model] = TokenBucket(limit, now)
        return bucket

    def _refuse(self, identity: str, model: str, whose: str, limit: RateLimit,
                wait: float) -> None:
        # The model label only for a model with its own limit: client-chosen names must not
        # grow the metric's series.
        self._refused(identity, model if model in self._model_limits else "")
        retry_ms = max(1, int(wait * 1000 + 0.999))
        raise RateLimited(f"rate limit of {whose} exceeded ({limit}); retry in {retry_ms} ms",
                          retry_ms)
