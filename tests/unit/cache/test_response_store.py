"""server.cache: the store's byte bound and eviction order, and the shares' isolation."""

from __future__ import annotations

import tracemalloc

import numpy as np

from server.cache import ServerCache
from server.cache.store import CacheStore, Entry
from server.spec import ModelSpec, TensorSpec
from server.types import DataType, InferRequest, InferResponse, OutputTensor

SPEC = ModelSpec("m", "onnxruntime_onnx", "onnxruntime", 8,
                 (TensorSpec("INPUT0", DataType.FP32, (4,)),),
                 (TensorSpec("OUTPUT0", DataType.FP32, (4,)),), response_cache=True)


def entry(nbytes: int, owner: int = 1) -> Entry:
    return Entry(owner, "m", "1", (), nbytes)


def test_the_least_recently_used_entry_goes_first() -> None:
    store = CacheStore(300)
    for name in "abc":
        assert store.put(name, entry(100))
    assert store.get("a") is not None  # a is now the most recent
    store.put("d", entry(100))
    assert store.get("b") is None
    assert all(store.get(name) is not None for name in "acd")
    assert store.evictions == 1 and store.used_bytes == 300


def test_the_bound_holds_for_any_sequence_of_insertions() -> None:
    store = CacheStore(1000)
    sizes = np.random.default_rng(0).integers(1, 400, 500)
    for index, size in enumerate(sizes):
        store.put(index % 37, entry(int(size)))
        assert store.used_bytes <= 1000
        assert store.used_bytes == sum(store.get(k).nbytes for k in list(store._entries))  # type: ignore[union-attr]


def test_an_entry_larger_than_the_cache_is_not_stored_and_evicts_nothing() -> None:
    store = CacheStore(100)
    store.put("kept", entry(60))
    assert not store.put("huge", entry(101))
    assert store.get("kept") is not None and store.get("huge") is None
    assert store.evictions == 0


def test_replacing_an_entry_counts_its_bytes_once() -> None:
    store = CacheStore(100)
    store.put("k", entry(60))
    store.put("k", entry(70))
    assert len(store) == 1 and store.used_bytes == 70 and store.evictions == 0


def test_dropping_a_share_removes_only_its_entries() -> None:
    store = CacheStore(1000)
    store.put("a", entry(10, owner=1))
    store.put("b", entry(20, owner=2))
    store.put("c", entry(30, owner=1))
    assert store.drop(1) == 2
    assert len(store) == 1 and store.used_bytes == 20 and store.get("b") is not None


def request(values: tuple[float, ...], request_id: str) -> InferRequest:
    array = np.array(values, np.float32).reshape(1, -1)
    return InferRequest("m", "1", request_id, {"INPUT0": array}, {"INPUT0": DataType.FP32})


def response(values: tuple[float, ...], request_id: str) -> InferResponse:
    raw = np.array(values, np.float32).tobytes()
    return InferResponse("m", "1", request_id,
                         [OutputTensor("OUTPUT0", DataType.FP32, raw=raw, shape=(1, 4))])


def test_two_loads_of_one_version_never_share_answers() -> None:
    cache = ServerCache(1 << 20)
    first, reloaded = cache.for_version(SPEC, "1"), cache.for_version(SPEC, "1")
    asked = request((1, 2, 3, 4), "x")
    first.put(first.key(asked), response((2, 4, 6, 8), "x"))
    assert reloaded.get(reloaded.key(asked), "y") is None
    assert first.get(first.key(asked), "y") is not None
    first.drop()
    first.put(first.key(asked), response((2, 4, 6, 8), "x"))  # a late answer of a dropped load
    assert len(cache.store) == 0


def test_a_hit_is_a_fresh_response_with_the_new_id() -> None:
    share = ServerCache(1 << 20).for_version(SPEC, "1")
    asked = request((1, 2, 3, 4), "x")
    share.put(share.key(asked), response((2, 4, 6, 8), "x"))
    hit = share.get(share.key(request((1, 2, 3, 4), "y")), "y")
    assert hit is not None and hit.id == "y"
    hit.parameters["routing_variant"] = "b"  # the data plane may add to a response
    hit.outputs.clear()
    again = share.get(share.key(asked), "z")
    assert again is not None and again.parameters == {} and len(again.outputs) == 1
    assert again.outputs[0].raw == np.array((2, 4, 6, 8), np.float32).tobytes()


def test_an_output_viewing_a_batch_array_is_stored_as_its_own_bytes() -> None:
    batch = np.arange(64, dtype=np.float32).reshape(16, 4)
    share = ServerCache(1 << 20).for_version(SPEC, "1")
    asked = request((1, 2, 3, 4), "x")
    share.put(share.key(asked), InferResponse(
        "m", "1", "x", [OutputTensor("OUTPUT0", DataType.FP32, batch[3:4])]))
    hit = share.get(share.key(asked), "y")
    assert hit is not None
    stored = hit.outputs[0]
    assert isinstance(stored.raw, bytes) and stored.raw == batch[3:4].tobytes()
    assert stored.shape == (1, 4)


def test_the_bytes_counted_cover_the_memory_the_entries_take() -> None:
    """What the store holds once the requests and responses are gone (keys, entries, output
    tensors and their bytes, the dictionary) stays within the bytes it counts."""
    cache = ServerCache(1 << 30)
    share = cache.for_version(SPEC, "1")
    tracemalloc.start()
    try:
        before, _ = tracemalloc.get_traced_memory()
        for i in range(2000):
            asked = request((i, i + 1, i + 2, i + 3), str(i))
            share.put(share.key(asked), response((i, 0, 0, 0), str(i)))
        del asked
        held, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(cache.store) == 2000
    assert 0 < held - before <= cache.store.used_bytes
