"""Memory attacks on a server, and a well-behaved client that must keep being served.

Each attack tries to make the server hold memory no bound would let it hold
(docs/configuration.md, "Bounds"): the ragged pair (padded together they would make a
2 x 30000 x 30000 batch), a flood of tiny BYTES elements to an unknown model, one stream that
writes large requests and never reads an answer, and many large requests at once. They take
the sizes as arguments: bench/studies/memory_attacks.py runs the issue's, and
tests/integration/test_memory_attacks.py smaller ones. Every payload is built once and the
same bytes object sent again, so the client's own memory stays small.

The models: ``ragged`` (tests/model_factory.py ``ragged_model`` with rank 2),
``identity_fp32`` (``identity_model``, FP32 [-1]) and ``identity_fp32_held``, the same model
whose batcher holds every batch below its full size for :data:`HELD_DELAY_US` (so large
requests sent together are all queued at once, however fast the model answers); the flood
names a model that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from bench.compare.model_repo import ORT_PARAMETERS, set_parameters
from bench.loadgen.inputs import InputTensor
from bench.loadgen.wire import (
    channel_options,
    infer_request_bytes,
    stream_callable,
    unary_callable,
)
from tests import model_factory

IDENTITY = "identity_fp32"
HELD = "identity_fp32_held"
#: How long ``identity_fp32_held`` holds a batch below its full size (a fixed queue delay).
HELD_DELAY_US = 1_500_000
RAGGED = "ragged"
UNKNOWN = "no_such_model"
RAGGED_EXTENT = 30_000
OK = "OK"


@dataclass(slots=True)
class Outcome:
    """What the attack's calls got back: counts by status, one message per status."""

    sent: int = 0
    codes: dict[str, int] = field(default_factory=dict)
    details: dict[str, str] = field(default_factory=dict)

    def count(self, code: str, detail: str = "") -> None:
        self.codes[code] = self.codes.get(code, 0) + 1
        if code != OK:
            self.details.setdefault(code, detail[:200])


def fp32_request(model: str, name: str, shape: tuple[int, ...]) -> bytes:
    """A request of ones (the content does not matter to these attacks)."""
    data = np.ones(shape, np.float32).tobytes()
    return infer_request_bytes(model, "", [InputTensor(name, "FP32", shape, data)])


def bytes_flood_request(elements: int) -> bytes:
    """``elements`` two-byte BYTES elements (6 bytes each on the wire) for an unknown model."""
    raw = b"\x02\x00\x00\x00ab" * elements
    return infer_request_bytes(UNKNOWN, "", [InputTensor("INPUT0", "BYTES", (1, elements), raw)])


async def _unary(channel: grpc.aio.Channel, payload: bytes, outcome: Outcome,
                 timeout_s: float) -> None:
    outcome.sent += 1
    try:
        await unary_callable(channel)(payload, timeout=timeout_s)
        outcome.count(OK)
    except grpc.aio.AioRpcError as exc:
        outcome.count(exc.code().name, exc.details() or "")


async def concurrent(url: str, payload: bytes, count: int, max_message_bytes: int,
                     timeout_s: float = 120.0, limit: int | None = None) -> Outcome:
    """``count`` unary calls of ``payload``, all at once (or ``limit`` at a time)."""
    outcome = Outcome()
    room = asyncio.Semaphore(limit or count)
    async with grpc.aio.insecure_channel(url, options=channel_options(max_message_bytes)) as ch:

        async def one() -> None:
            async with room:
                await _unary(ch, payload, outcome, timeout_s)

        await asyncio.gather(*(one() for _ in range(count)))
    return outcome


async def ragged_pairs(url: str, pairs: int) -> Outcome:
    """``pairs`` of [1, 1, 30000] and [1, 30000, 1] requests, all sent at once."""
    wide = fp32_request(RAGGED, "X", (1, 1, RAGGED_EXTENT))
    tall = fp32_request(RAGGED, "X", (1, RAGGED_EXTENT, 1))
    outcome = Outcome()
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        await asyncio.gather(*(_unary(channel, payload, outcome, 120.0)
                               for _ in range(pairs) for payload in (wide, tall)))
    return outcome


@dataclass(slots=True)
class StreamOutcome:
    written: int = 0
    stalled: bool = False  # the writes stopped progressing before all were written


async def unread_stream(url: str, requests: int, nbytes: int,
                        stall_s: float = 3.0) -> StreamOutcome:
    """One ModelStreamInfer call writing ``requests`` requests of ``nbytes`` (FP32 to the
    identity model) and never reading an answer. Returns once every request is written or
    no write has completed for ``stall_s`` (the server holds the stream back), after
    cancelling the call."""
    payload = fp32_request(IDENTITY, "INPUT0", (1, nbytes // 4))
    result = StreamOutcome()
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        call = stream_callable(channel)()
        last = time.monotonic()

        async def write() -> None:
            nonlocal last
            for _ in range(requests):
                await call.write(payload)
                result.written += 1
                last = time.monotonic()

        writer = asyncio.ensure_future(write())
        while not writer.done():
            await asyncio.sleep(0.1)
            if time.monotonic() - last > stall_s:
                result.stalled = True
                break
        writer.cancel()
        call.cancel()
        with contextlib.suppress(asyncio.CancelledError, grpc.aio.AioRpcError,
                                 asyncio.InvalidStateError):
            await writer
    return result


@dataclass(slots=True)
class Served:
    """The well-behaved client's figures over a span of time."""

    ok: int = 0
    failed: dict[str, int] = field(default_factory=dict)
    latencies_ms: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {"ok": self.ok, "failed": dict(self.failed),
                "p99_ms": round(float(np.percentile(self.latencies_ms, 99)), 3)
                if self.latencies_ms else None,
                "max_ms": round(max(self.latencies_ms), 3) if self.latencies_ms else None}


#: One answer of the well-behaved client: (monotonic ns at the send, latency ms, status).
Answer = tuple[int, float, str]


async def _well_behaved(url: str, stop: Any, ready: Any, timeout_s: float) -> list[Answer]:
    payload = fp32_request(IDENTITY, "INPUT0", (1, 16))
    answers: list[Answer] = []
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        call = unary_callable(channel)
        while not stop.is_set():
            start = time.monotonic_ns()
            code = OK
            try:
                await call(payload, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            answers.append((start, (time.monotonic_ns() - start) / 1e6, code))
            if code == OK:
                ready.set()
            else:
                await asyncio.sleep(0.01)
    return answers


def _well_behaved_main(url: str, stop: Any, ready: Any, results: Any, timeout_s: float) -> None:
    results.put(asyncio.run(_well_behaved(url, stop, ready, timeout_s)))


class WellBehaved:
    """A process of its own (so the attacker's work in this one does not slow it) sending
    one small request at a time ([1, 16] FP32 to the identity model) until the block ends;
    :meth:`served` counts its answers to the requests sent inside a span of time."""

    def __init__(self, url: str, timeout_s: float = 60.0) -> None:
        context = multiprocessing.get_context("spawn")
        self._stop = context.Event()
        self._ready = context.Event()
        self._results: Any = context.Queue()
        self._process = context.Process(
            target=_well_behaved_main, name="well-behaved", daemon=True,
            args=(url, self._stop, self._ready, self._results, timeout_s))
        self.answers: list[Answer] = []

    def served(self, start_ns: int, end_ns: int = 2**63) -> Served:
        served = Served()
        for at, latency_ms, code in self.answers:
            if start_ns <= at < end_ns:
                if code == OK:
                    served.ok += 1
                    served.latencies_ms.append(latency_ms)
                else:
                    served.failed[code] = served.failed.get(code, 0) + 1
        return served

    def __enter__(self) -> WellBehaved:
        """Start the client and return once it has had an answer."""
        self._process.start()
        if not self._ready.wait(60):
            self._stop.set()
            raise TimeoutError("the well-behaved client got no answer in 60 s")
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self.answers = self._results.get(timeout=120)
        self._process.join(timeout=30)


def attack_repository(root: Path) -> Path:
    """``root`` with the attacks' models (one ONNX Runtime thread, spinning off, as every
    benchmark's): ``identity_fp32``, ``identity_fp32_held`` and ``ragged``."""
    for model_dir in (model_factory.identity_model(root, IDENTITY, "FP32"),
                      model_factory.identity_model(root, HELD, "FP32",
                                                   max_queue_delay_microseconds=HELD_DELAY_US,
                                                   queue_delay="fixed"),
                      model_factory.ragged_model(root, RAGGED, rank=2)):
        config = model_dir / "config.pbtxt"
        config.write_text(set_parameters(config.read_text(encoding="utf-8"), ORT_PARAMETERS),
                          encoding="utf-8")
    return root
