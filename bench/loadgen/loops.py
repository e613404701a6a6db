"""The load loops of one generator process: closed or open loop, unary or streaming.

Which requests count, in every mode: those *issued* inside the measurement window (closed
loop: sent; open loop: scheduled), whose outcomes are awaited after the window (up to
``drain_s``; still unanswered then: ``UNFINISHED``), so ``sent == ok + sum(errors)``. Their
latency runs from the send time (closed loop) or from the *scheduled* time (open loop), so
a server or generator that falls behind the schedule shows up in the latency instead of
silently lowering the offered load (coordinated omission). Throughput counts the successful
responses that *arrive* inside the window, divided by its length.

All times are ``time.monotonic_ns()``: CLOCK_MONOTONIC is system-wide on Linux, so the
parent can give every process the same start instant.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import random
import time
from collections.abc import Iterator, MutableSequence
from dataclasses import dataclass, field
from typing import Any

import grpc

from bench.loadgen.cpu import self_cpu_s
from bench.loadgen.histogram import LatencyHistogram
from bench.loadgen.wire import (
    channel_options,
    error_code_of_message,
    id_suffix,
    parse_stream_response,
    stream_callable,
    unary_callable,
)
from server.cli.connection import ClientSecurity

UNFINISHED = "UNFINISHED"


@dataclass(frozen=True, slots=True)
class StepPlan:
    """One generator process's share of one step."""

    rpc: str  # "unary" or "stream"
    mode: str  # "closed" or "open"
    concurrency: int  # closed: requests in flight; open: cap on requests in flight
    rate: float  # open loop: requests/s of this process
    arrival: str  # open loop: "poisson" or "constant"
    phase_s: float  # open loop: offset of this process's first arrival
    start_at_ns: int  # monotonic instant at which the warm-up begins
    warmup_s: float
    duration_s: float | None  # measured seconds, or None with ``requests``
    requests: int | None  # measured requests of this process, or None with ``duration_s``
    timeout_s: float  # per-request deadline
    drain_s: float  # how long to wait for the window's requests after it ends
    seed: int


@dataclass(frozen=True, slots=True)
class Target:
    url: str
    payload: bytes  # the serialised ModelInferRequest
    rows: int  # batch rows per request (samples/s = rows * infer/s)
    stream_format: str = "triton"  # what the server's stream answers are (bench/loadgen/wire.py)
    max_message_bytes: int = 64 * 1024 * 1024
    #: TLS, and the token sent with every call.
    security: ClientSecurity = field(default_factory=ClientSecurity)


@dataclass(slots=True)
class WorkerResult:
    sent: int = 0
    ok: int = 0
    errors: dict[str, int] | None = None
    completed_in_window: int = 0
    window_s: float = 0.0
    cpu_s: float = 0.0
    histogram: str = ""
    send_lag: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "sent": self.sent, "ok": self.ok, "errors": dict(self.errors or {}),
            "completed_in_window": self.completed_in_window, "window_s": self.window_s,
            "cpu_s": self.cpu_s, "histogram": self.histogram, "send_lag": self.send_lag,
        }


def arrivals(rate: float, arrival: str, first_ns: int, seed: int) -> Iterator[int]:
    """Scheduled send instants: constant spacing or exponential gaps (a Poisson process)."""
    gap_ns = 1e9 / rate
    if arrival == "constant":
        for k in itertools.count():
            yield first_ns + int(k * gap_ns)
    elif arrival == "poisson":
        rng = random.Random(seed)
        at = float(first_ns)
        while True:
            yield int(at)
            at += rng.expovariate(1.0) * gap_ns
    else:
        raise ValueError(f"arrival must be poisson or constant, got {arrival!r}")


def call_metadata(target: Target) -> grpc.aio.Metadata:
    """The metadata of every call, built once: grpc.aio converts anything else per call."""
    return grpc.aio.Metadata(*target.security.metadata)


class _Tally:
    """Counts and latencies of the window's requests; everything else is warm-up or tail."""

    __slots__ = ("completed", "end_ns", "ended", "errors", "last_ns", "latencies", "ok", "progress",
                 "progress_slot", "quota", "sent", "start_ns")

    def __init__(self, plan: StepPlan, progress: MutableSequence[int], slot: int) -> None:
        self.start_ns = plan.start_at_ns + int(plan.warmup_s * 1e9)
        self.end_ns = (self.start_ns + int(plan.duration_s * 1e9)
                       if plan.duration_s is not None else 2**62)
        self.quota = plan.requests
        self.ended = asyncio.Event()  # set when request-count mode has issued its quota
        self.sent = self.ok = self.completed = 0
        self.last_ns = 0
        self.errors: dict[str, int] = {}
        self.latencies: list[int] = []
        self.progress = progress
        self.progress_slot = slot

    def may_issue(self, now_ns: int) -> bool:
        if now_ns >= self.end_ns:
            return False
        return self.quota is None or now_ns < self.start_ns or self.sent < self.quota

    def issued(self, at_ns: int) -> bool:
        """Count a request issued (or scheduled) at ``at_ns``; True when it is measured."""
        if self.start_ns <= at_ns < self.end_ns:
            self.sent += 1
            if self.quota is not None and self.sent >= self.quota:
                self.end_ns = at_ns + 1  # request-count mode: no more measured requests
                self.ended.set()
            return True
        return False

    def done(self, measured: bool, issued_ns: int, now_ns: int, code: str | None) -> None:
        if code is None:
            if self.start_ns <= now_ns < self.end_ns or (measured and self.quota is not None):
                self.completed += 1
            if measured:
                self.ok += 1
                self.latencies.append(now_ns - issued_ns)
                self.last_ns = max(self.last_ns, now_ns)
                self.progress[self.progress_slot] += 1
        elif measured:
            self.errors[code] = self.errors.get(code, 0) + 1
            self.last_ns = max(self.last_ns, now_ns)
            self.progress[self.progress_slot + 1] += 1

    def outstanding(self) -> int:
        return self.sent - self.ok - sum(self.errors.values())


class Generator:
    """Runs one :class:`StepPlan` on one channel of this process's event loop."""

    def __init__(self, target: Target, progress: MutableSequence[int], slot: int) -> None:
        self._target = target
        self._progress = progress
        self._slot = slot

    async def run(self, plan: StepPlan) -> WorkerResult:
        tally = _Tally(plan, self._progress, self._slot)
        lag: list[int] = []
        target = self._target
        async with target.security.aio_channel(
            target.url, channel_options(target.max_message_bytes)
        ) as channel:
            await asyncio.wait_for(channel.channel_ready(), timeout=30)
            window = asyncio.get_running_loop().create_task(self._window_cpu(tally))
            if plan.mode == "closed" and plan.rpc == "unary":
                load = self._closed_unary(channel, plan, tally)
            elif plan.mode == "closed":
                load = self._stream(channel, plan, tally, None, lag)
            elif plan.rpc == "unary":
                load = self._open_unary(channel, plan, tally, lag)
            else:
                load = self._stream(channel, plan, tally, self._schedule(plan, tally), lag)
            await self._sleep_until(plan.start_at_ns)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(load, timeout=self._deadline_s(plan))
            tally.ended.set()
            cpu0, cpu1, end_ns = await window
            if plan.requests is not None:  # request-count mode: up to the last measured answer
                cpu1, end_ns = self_cpu_s(), max(end_ns, tally.last_ns)
        window_s = max(end_ns - tally.start_ns, 1) / 1e9
        if tally.outstanding():
            tally.errors[UNFINISHED] = tally.errors.get(UNFINISHED, 0) + tally.outstanding()
        histogram = LatencyHistogram()
        histogram.record_many(tally.latencies)
        lag_histogram = LatencyHistogram()
        lag_histogram.record_many(lag)
        return WorkerResult(
            sent=tally.sent, ok=tally.ok, errors=tally.errors,
            completed_in_window=tally.completed, window_s=window_s, cpu_s=cpu1 - cpu0,
            histogram=histogram.encode(), send_lag=lag_histogram.encode(),
        )

    @staticmethod
    def _deadline_s(plan: StepPlan) -> float:
        """The step may not run longer than this, counted from now; then the rest is dropped."""
        lead = max(0.0, (plan.start_at_ns - time.monotonic_ns()) / 1e9)
        if plan.duration_s is not None:
            return lead + plan.warmup_s + plan.duration_s + plan.drain_s
        return math.inf if plan.requests is None else lead + plan.warmup_s + 3600.0

    @staticmethod
    async def _sleep_until(at_ns: int) -> None:
        delay = (at_ns - time.monotonic_ns()) / 1e9
        if delay > 0:
            await asyncio.sleep(delay)

    async def _window_cpu(self, tally: _Tally) -> tuple[float, float, int]:
        """CPU seconds of this process at the window's start and end, and the end instant."""
        await self._sleep_until(tally.start_ns)
        cpu0 = self_cpu_s()
        remaining = (tally.end_ns - time.monotonic_ns()) / 1e9 if tally.quota is None else None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(tally.ended.wait(), timeout=remaining)
        return cpu0, self_cpu_s(), min(tally.end_ns, time.monotonic_ns())

    @staticmethod
    def _schedule(plan: StepPlan, tally: _Tally) -> Iterator[int]:
        first = plan.start_at_ns + int(plan.phase_s * 1e9)
        return arrivals(plan.rate, plan.arrival, first, plan.seed)

    # -- unary --------------------------------------------------------------------------------

    async def _closed_unary(
        self, channel: grpc.aio.Channel, plan: StepPlan, tally: _Tally
    ) -> None:
        call = unary_callable(channel)
        payload = self._target.payload
        metadata = call_metadata(self._target)
        timeout = plan.timeout_s
        now = time.monotonic_ns

        async def slot() -> None:
            while tally.may_issue(start := now()):
                measured = tally.issued(start)
                code: str | None = None
                try:
                    await call(payload, timeout=timeout, metadata=metadata)
                except grpc.aio.AioRpcError as exc:
                    code = exc.code().name
                tally.done(measured, start, now(), code)

        await asyncio.gather(*(slot() for _ in range(plan.concurrency)))

    async def _open_unary(
        self, channel: grpc.aio.Channel, plan: StepPlan, tally: _Tally, lag: list[int]
    ) -> None:
        call = unary_callable(channel)
        payload = self._target.payload
        metadata = call_metadata(self._target)
        timeout = plan.timeout_s
        now = time.monotonic_ns
        loop = asyncio.get_running_loop()
        inflight: set[asyncio.Task[None]] = set()
        room = asyncio.Event()

        async def one(scheduled: int, measured: bool) -> None:
            code: str | None = None
            try:
                await call(payload, timeout=timeout, metadata=metadata)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
            tally.done(measured, scheduled, now(), code)

        def finished(task: asyncio.Task[None]) -> None:
            inflight.discard(task)
            room.set()

        for scheduled in self._schedule(plan, tally):
            if not tally.may_issue(scheduled):
                break
            if (delay := (scheduled - now()) / 1e9) > 0:
                await asyncio.sleep(delay)
            while len(inflight) >= plan.concurrency:
                room.clear()
                await room.wait()
            measured = tally.issued(scheduled)
            if measured:
                lag.append(now() - scheduled)
            task = loop.create_task(one(scheduled, measured))
            inflight.add(task)
            task.add_done_callback(finished)
        if inflight:
            await asyncio.wait(inflight)

    # -- streaming ----------------------------------------------------------------------------

    async def _stream(
        self,
        channel: grpc.aio.Channel,
        plan: StepPlan,
        tally: _Tally,
        schedule: Iterator[int] | None,
        lag: list[int],
    ) -> None:
        """ModelStreamInfer on one stream, reopened if the server ends it inside the step.

        Closed loop (``schedule`` None): ``concurrency`` requests in flight, each answer sends
        the next. Open loop: a sender task writes at the scheduled instants.
        """
        open_stream = stream_callable(channel)
        metadata = call_metadata(self._target)
        ids = itertools.count()
        while tally.may_issue(time.monotonic_ns()):
            stream = _Stream(open_stream(metadata=metadata), self._target, tally, ids, lag)
            if await stream.run(plan, schedule):
                return
            await asyncio.sleep(0.01)


class _Stream:
    """One open ModelStreamInfer call and the requests in flight on it.

    Answers are matched by request id, or in order when the server does not echo ids.
    """

    def __init__(
        self, call: Any, target: Target, tally: _Tally, ids: Iterator[int], lag: list[int]
    ) -> None:
        self._call = call
        self._payload = target.payload
        self._format = target.stream_format
        self._tally = tally
        self._ids = ids
        self._lag = lag
        self._pending: dict[str, tuple[int, bool]] = {}
        self._room = asyncio.Event()

    async def _send(self, at_ns: int, scheduled: bool) -> None:
        rid = str(next(self._ids))
        measured = self._tally.issued(at_ns)
        self._pending[rid] = (at_ns, measured)
        if scheduled and measured:
            self._lag.append(time.monotonic_ns() - at_ns)
        # InvalidStateError: the server ended the stream; reading it raises the status.
        with contextlib.suppress(asyncio.InvalidStateError):
            await self._call.write(self._payload + id_suffix(rid))

    async def _sender(self, plan: StepPlan, schedule: Iterator[int]) -> None:
        now = time.monotonic_ns
        for scheduled in schedule:
            if not self._tally.may_issue(scheduled):
                break
            if (delay := (scheduled - now()) / 1e9) > 0:
                await asyncio.sleep(delay)
            while len(self._pending) >= plan.concurrency:
                self._room.clear()
                await self._room.wait()
            await self._send(scheduled, scheduled=True)
        await self._call.done_writing()

    async def run(self, plan: StepPlan, schedule: Iterator[int] | None) -> bool:
        """True when the stream ended normally, False when the server broke it off."""
        now = time.monotonic_ns
        tally, pending = self._tally, self._pending
        writer: asyncio.Task[None] | None = None
        try:
            if schedule is None:
                for _ in range(plan.concurrency):
                    if tally.may_issue(now()):
                        await self._send(now(), scheduled=False)
                if not pending:
                    await self._call.done_writing()
            else:
                writer = asyncio.get_running_loop().create_task(self._sender(plan, schedule))
            while (data := await self._call.read()) is not grpc.aio.EOF:
                rid, error = parse_stream_response(data, self._format)
                entry = pending.pop(rid, None)
                if entry is None and pending:
                    entry = pending.pop(next(iter(pending)))
                if entry is None:
                    continue
                self._room.set()
                tally.done(entry[1], entry[0], now(),
                           error_code_of_message(error) if error else None)
                if schedule is None:
                    if tally.may_issue(now()):
                        await self._send(now(), scheduled=False)
                    elif not pending:
                        await self._call.done_writing()
            if pending:  # the stream ended with requests unanswered
                await self._call  # raises the status, if it was not OK
            if writer is not None:
                await writer
            return True
        except grpc.aio.AioRpcError as exc:
            at = now()
            for issued_ns, measured in pending.values():
                tally.done(measured, issued_ns, at, exc.code().name)
            pending.clear()
            return False
        finally:
            if writer is not None and not writer.done():
                writer.cancel()
