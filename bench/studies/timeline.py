"""Open-loop unary load in phases of different rates, every request recorded.

The load generator (``bench/loadgen/loops.py``) reports a step's totals; a study of what
happens *over time* (overload and recovery) needs each request: when it was scheduled, when
it was sent, when its answer came and with which status. Arrivals come from the generator's
own schedule (:func:`bench.loadgen.loops.arrivals`), one phase after the other on one
channel; latency runs from the scheduled instant (no coordinated omission), and the send lag
says when this process could not keep up with the schedule.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
import numpy.typing as npt

from bench.loadgen.loops import arrivals
from bench.loadgen.wire import channel_options, unary_callable

OK = "OK"


@dataclass(frozen=True, slots=True)
class Phase:
    name: str
    rate: float  # requests/s
    seconds: float


@dataclass(slots=True)
class Timeline:
    """Every request of a run, column-wise; times in monotonic ns."""

    #: (name, rate, start, end) of each phase.
    phases: list[tuple[str, float, int, int]] = field(default_factory=list)
    scheduled: list[int] = field(default_factory=list)
    sent: list[int] = field(default_factory=list)
    done: list[int] = field(default_factory=list)
    code: list[str] = field(default_factory=list)
    #: One message per status code other than OK (the first seen).
    details: dict[str, str] = field(default_factory=dict)

    def arrays(self) -> dict[str, npt.NDArray[np.int64]]:
        return {name: np.array(getattr(self, name), dtype=np.int64)
                for name in ("scheduled", "sent", "done")}


async def run_phases(url: str, payload: bytes, phases: Sequence[Phase], seed: int = 0,
                     timeout_s: float = 10.0, arrival: str = "poisson") -> Timeline:
    """Send ``payload`` (a serialised ModelInferRequest) at each phase's rate for its
    seconds, then wait for every answer (each call has ``timeout_s``)."""
    timeline = Timeline()
    loop = asyncio.get_running_loop()
    now = time.monotonic_ns
    pending: set[asyncio.Task[None]] = set()
    async with grpc.aio.insecure_channel(url, options=channel_options()) as channel:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        call = unary_callable(channel)

        async def one(scheduled: int) -> None:
            sent = now()
            code = OK
            try:
                await call(payload, timeout=timeout_s)
            except grpc.aio.AioRpcError as exc:
                code = exc.code().name
                timeline.details.setdefault(code, exc.details() or "")
            timeline.scheduled.append(scheduled)
            timeline.sent.append(sent)
            timeline.done.append(now())
            timeline.code.append(code)

        start = now() + 50_000_000
        for index, phase in enumerate(phases):
            end = start + int(phase.seconds * 1e9)
            timeline.phases.append((phase.name, phase.rate, start, end))
            for scheduled in arrivals(phase.rate, arrival, start, seed + index):
                if scheduled >= end:
                    break
                if (delay := (scheduled - now()) / 1e9) > 0:
                    await asyncio.sleep(delay)
                task = loop.create_task(one(scheduled))
                pending.add(task)
                task.add_done_callback(pending.discard)
            start = end
        while pending:
            await asyncio.wait(set(pending))
    return timeline
