"""The response cache (Triton's ``--cache-config local,size=N``): answers of models with
``response_cache { enable: true }``, kept in one store bounded in bytes, least recently used
first out.

``key.py`` says what identifies an answer, ``store.py`` keeps the answers within the bound,
``share.py`` is one loaded version's view of the store (what the data plane calls). The
composition root builds one :class:`ServerCache` when the flag is given; the repository
manager asks it for a share per loaded version and drops the share when the version goes.
"""

from __future__ import annotations

import itertools

from server.cache.share import VersionShare
from server.cache.store import CacheStore
from server.spec import ModelSpec


class ServerCache:
    """The server's one store and the shares of it (implements ResponseCacheFactory)."""

    def __init__(self, capacity_bytes: int) -> None:
        self.store = CacheStore(capacity_bytes)
        self._owners = itertools.count(1)

    def for_version(self, spec: ModelSpec, version: str) -> VersionShare:
        """A share of its own for every load, so that a reload of the same version number
        never answers with what the previous load computed."""
        return VersionShare(self.store, next(self._owners))


__all__ = ["CacheStore", "ServerCache", "VersionShare"]
