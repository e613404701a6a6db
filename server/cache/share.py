"""One loaded version's share of the cache: what the data plane calls (ResponseCache)."""

from __future__ import annotations

from collections.abc import Hashable

from server.cache.key import key_inputs, parsed_key, request_key
from server.cache.store import ENTRY_OVERHEAD, TENSOR_OVERHEAD, CacheStore, Entry
from server.codec.encode import raw_bytes
from server.types import InferRequest, InferResponse, OutputTensor, ParsedRequest


class VersionShare:
    """Keys carry the share's owner number, so shares never see each other's answers."""

    __slots__ = ("_open", "_store", "owner")

    def __init__(self, store: CacheStore, owner: int) -> None:
        self._store = store
        self.owner = owner
        self._open = True

    def key(self, request: InferRequest) -> Hashable:
        return request_key(self.owner, request)

    def parsed_key(self, parsed: ParsedRequest) -> Hashable | None:
        return parsed_key(self.owner, parsed)

    def get(self, key: Hashable, request_id: str) -> InferResponse | None:
        entry = self._store.get(key)
        if entry is None:
            return None
        return InferResponse(entry.model_name, entry.model_version, request_id,
                             list(entry.outputs))

    def put(self, key: Hashable, response: InferResponse) -> None:
        if self._open:
            self._store.put(key, _entry(self.owner, key, response))

    def drop(self) -> None:
        self._open = False
        self._store.drop(self.owner)


def _entry(owner: int, key: Hashable, response: InferResponse) -> Entry:
    """The response's outputs as owned raw bytes (the native unpacker's already are), so an
    entry never keeps a whole batch's output array alive through a view of it."""
    outputs = tuple(t if t.raw is not None else
                    OutputTensor(t.name, t.datatype, raw=raw_bytes(t), shape=t.shape)
                    for t in response.outputs)
    nbytes = (ENTRY_OVERHEAD + TENSOR_OVERHEAD * (key_inputs(key) + len(outputs))
              + sum(len(t.raw) for t in outputs if t.raw is not None))
    return Entry(owner, response.model_name, response.model_version, outputs, nbytes)
