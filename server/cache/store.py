"""The answers, bounded in bytes, least recently used evicted first.

One OrderedDict on the event loop thread: a lookup moves its entry to the end, an insertion
evicts from the front until the new entry fits. No lock: only the loop touches it.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable

from server.types import OutputTensor

#: What an entry costs beside its tensors' bytes, counted against the bound: the dictionary
#: slot, the key (its tuples, the shapes, the digest) and the entry object; and per tensor
#: (each input named in the key, each output kept), its object, shape and bytes header.
#: Generous estimates of CPython's sizes, so the bound holds for the memory actually taken.
ENTRY_OVERHEAD = 512
TENSOR_OVERHEAD = 256


class Entry:
    """One stored answer: its outputs, immutable once stored. Response parameters are not
    kept: the only ones the server sets (the router's variant) belong to each request."""

    __slots__ = ("model_name", "model_version", "nbytes", "outputs", "owner")

    def __init__(self, owner: int, model_name: str, model_version: str,
                 outputs: tuple[OutputTensor, ...], nbytes: int) -> None:
        #: The share that stored it.
        self.owner = owner
        self.model_name = model_name
        self.model_version = model_version
        self.outputs = outputs
        self.nbytes = nbytes


class CacheStore:
    """Entries of every share (their keys begin with the share's number)."""

    def __init__(self, capacity_bytes: int) -> None:
        if capacity_bytes <= 0:
            raise ValueError("the response cache needs a positive size")
        self.capacity_bytes = capacity_bytes
        #: Bytes the entries count for (never above the capacity).
        self.used_bytes = 0
        #: Entries pushed out to make room, since start.
        self.evictions = 0
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: Hashable) -> Entry | None:
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
        return entry

    def put(self, key: Hashable, entry: Entry) -> bool:
        """Store ``entry`` (replacing one under the same key); False when it is larger than
        the whole cache, which then keeps what it had."""
        if entry.nbytes > self.capacity_bytes:
            return False
        entries = self._entries
        previous = entries.pop(key, None)
        if previous is not None:
            self.used_bytes -= previous.nbytes
        while self.used_bytes + entry.nbytes > self.capacity_bytes:
            _, evicted = entries.popitem(last=False)
            self.used_bytes -= evicted.nbytes
            self.evictions += 1
        entries[key] = entry
        self.used_bytes += entry.nbytes
        return True

    def drop(self, owner: int) -> int:
        """Remove every entry of share ``owner`` (a version unloaded); how many there were.
        A scan of the whole store: versions go rarely, requests come often."""
        gone = [key for key, entry in self._entries.items() if entry.owner == owner]
        for key in gone:
            self.used_bytes -= self._entries.pop(key).nbytes
        return len(gone)
