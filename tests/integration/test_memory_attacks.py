"""Memory attacks on a `peregrine serve` subprocess (so its RSS is its own): the ragged pair,
a BYTES flood to an unknown model, a stream that never reads its answers, and large requests
past the queued-bytes bound. The server's RSS stays within a bound of its idle RSS while a
well-behaved client (a process of its own) keeps being served.

Smaller than the issue's sizes (bench/studies/memory_attacks.py runs those) so the module
runs in well under a minute, with bounds set so that each attack would pass the RSS bound by
far without the server's bound it exercises: the ragged pair padded together is 7.2 GB;
1.5 million BYTES elements decode into ~100 MB of Python objects per request; the unread
stream writes up to 300 MiB whose answers would wait in the server; six 8 MiB requests at
once to a model that holds its batches would all queue, past a 16 MiB bound. Messages stay
small and few at a time: every message gRPC receives costs the server a few times its size
before any handler sees it, which no bound of the server limits (bench/RESULTS.md, "Memory
attacks").
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Coroutine, Iterator
from typing import Any

import pytest

from bench.compare.servers import PeregrineProcess
from bench.studies import attacks
from bench.studies.rss import MIB, ProcessSampler

#: The rerun with frontend processes (tests/integration/test_reruns.py).
FRONTENDS = int(os.environ.get("PEREGRINE_FRONTENDS", "1")) > 1

pytestmark = pytest.mark.timeout(120)

#: Server RSS growth over its idle RSS that an attack may cause.
GROWTH = 160 * MIB
#: The same for six 8 MiB requests at once: gRPC holds each message being received a few times
#: over before any bound sees it (97-180 MiB measured with the bound, the pure-Python decode
#: the highest; 201-265 MiB without it).
LARGE_GROWTH = 192 * MIB
QUEUED = 16 * MIB
FLAGS = ("--max-inflight-per-stream", "8", "--max-queued-bytes", str(QUEUED),
         "--max-request-bytes", str(QUEUED))


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PeregrineProcess]:
    root = attacks.attack_repository(tmp_path_factory.mktemp("attacks_repo"))
    running = PeregrineProcess(root, name="test-memory-attacks", extra_args=FLAGS)
    with running:
        yield running


def under_attack(server: PeregrineProcess,
                 run: Coroutine[Any, Any, Any]) -> tuple[Any, int, attacks.Served]:
    """Run ``run`` while the well-behaved client runs; the server's peak RSS growth over its
    RSS just before, and the client's answers to what it sent from the attack's start (and
    for a moment after, so that a short attack still sees some)."""
    with ProcessSampler(server.pid, 0.02) as sampler, attacks.WellBehaved(server.url) as client:
        idle = max(s.rss for s in sampler.samples)
        start = time.monotonic_ns()
        outcome = asyncio.run(run)
        time.sleep(0.3)
    return outcome, sampler.peak(start) - idle, client.served(start)


def assert_served(served: attacks.Served) -> None:
    """The well-behaved client kept being answered."""
    assert served.ok >= 1 and served.failed == {}, served.summary()


def test_the_ragged_pair_runs_in_separate_batches(server: PeregrineProcess) -> None:
    outcome, growth, served = under_attack(server, attacks.ragged_pairs(server.url, 2))
    assert outcome.codes == {"OK": 4}
    assert growth < GROWTH
    assert_served(served)


def test_a_bytes_flood_to_an_unknown_model_is_refused_before_decoding(
    server: PeregrineProcess,
) -> None:
    flood = attacks.bytes_flood_request(1_500_000)  # 9 MB
    outcome, growth, served = under_attack(
        server, attacks.concurrent(server.url, flood, 4, 16 * MIB, limit=2))
    assert outcome.codes == {"RESOURCE_EXHAUSTED": 4}
    assert "--max-bytes-elements" in outcome.details["RESOURCE_EXHAUSTED"]
    assert growth < GROWTH
    assert_served(served)


def test_a_stream_that_never_reads_is_held_back(server: PeregrineProcess) -> None:
    outcome, growth, served = under_attack(
        server, attacks.unread_stream(server.url, 300, MIB, stall_s=1.5))
    assert outcome.stalled and outcome.written < 300
    assert growth < GROWTH
    assert_served(served)


def test_large_requests_past_the_queued_bytes_are_refused(server: PeregrineProcess) -> None:
    # Just under 8 MiB each, so that the two the bound admits leave room for the well-behaved
    # client's small requests; sent to the model whose batcher holds them (attacks.HELD), so
    # that the first two are still queued when the others arrive, however fast the model is.
    large = attacks.fp32_request(attacks.HELD, "INPUT0", (1, 2 * MIB - 1024))
    outcome, growth, served = under_attack(
        server, attacks.concurrent(server.url, large, 6, 16 * MIB))
    assert outcome.codes.get("OK", 0) >= 2
    assert outcome.codes.get("RESOURCE_EXHAUSTED", 0) >= 1
    assert set(outcome.codes) <= {"OK", "RESOURCE_EXHAUSTED"}
    # With frontends, the frontend's request arena (twice --max-queued-bytes) also holds the
    # requests on their way to the engine, not yet admitted or refused there: under six at
    # once it can be the bound that refuses first, and it names itself.
    bounds = ("--max-queued-bytes", "--frontend-arena-bytes") if FRONTENDS \
        else ("--max-queued-bytes",)
    named = outcome.details["RESOURCE_EXHAUSTED"]
    assert any(bound in named for bound in bounds), named
    assert growth < LARGE_GROWTH
    assert_served(served)
