"""Fuzzing a real ``peregrine serve``: many hypothesis-made requests, every answer judged.

Run from the repository root:

    python -m bench.studies.fuzz_server [--cases 100000] [--workers 2] [--chunk 2000]
        [--timeout 10] [--seed 0] [--repository DIR] [--server-cpus 0] [--no-results-md]

A ``peregrine serve`` subprocess serves ``--repository`` (default: the example models,
built if missing), so a crash shows as the process dying; client shared memory is allowed
and one region registered (bench/fuzz/region.py) for requests to name. The cases come from
bench/fuzz/strategies.py (the strategies the CI test uses) against the models the server
reports; ``--workers`` processes send them, each hypothesis run ``--chunk`` cases with seed
``--seed`` + its chunk index, so any chunk can be generated again. Every answer is judged by
bench/fuzz/client.py: a proper status (OK, INVALID_ARGUMENT, NOT_FOUND, UNAVAILABLE,
RESOURCE_EXHAUSTED, FAILED_PRECONDITION, UNIMPLEMENTED, DEADLINE_EXCEEDED), an INTERNAL with
only a correlation id (flagged), anything else (failed), or no answer within ``--timeout``
seconds (a hang). Afterwards the server must still be running, answer ServerLive, and answer
each model's valid request with the bytes it answered before the run.

Writes bench/results/fuzz_server.json and the "Fuzzing" section of bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import multiprocessing
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import grpc
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st

from bench.compare.model_repo import ensure_examples
from bench.compare.servers import PeregrineProcess, ServerProcess
from bench.fuzz.client import FAILED, FLAGGED, HANG, FuzzClient, Outcome
from bench.fuzz.region import registered_region
from bench.fuzz.strategies import Case, cases
from bench.fuzz.targets import Target, discover, valid_request
from bench.loadgen.environment import environment
from bench.results_md import RESULTS_DIR, markdown_table, replace_section, section_header
from server._pb import grpc_service_pb2 as pb
from server._pb import grpc_service_pb2_grpc as pb_grpc

SECTION = "## Fuzzing: malformed and hostile ModelInferRequests through a real server"
RESULTS_JSON = RESULTS_DIR / "fuzz_server.json"
EXAMPLE_MODELS = ["cnn", "image_classifier", "mlp_classifier", "text_encoder"]
#: Problem cases kept per chunk (the bytes in hex), for reproducing them.
KEPT = 20
#: What grpc says when the transport, not the server's code, failed a call.
TRANSPORT = ("failed to connect", "connection refused", "socket closed", "connection reset",
             "broken pipe")


@dataclass
class Tally:
    """Counts over many cases."""

    cases: int = 0
    by_rpc: collections.Counter[str] = field(default_factory=collections.Counter)
    #: answers by "rpc code" (a stream answers each of its requests)
    answers: collections.Counter[str] = field(default_factory=collections.Counter)
    #: cases by "kind verdict" (valid, mutated, corrupted, random, stream)
    kinds: collections.Counter[str] = field(default_factory=collections.Counter)
    verdicts: collections.Counter[str] = field(default_factory=collections.Counter)
    max_seconds: float = 0.0
    total_seconds: float = 0.0
    problems: list[dict[str, Any]] = field(default_factory=list)
    lost_server: bool = False

    def add(self, case: Case, outcome: Outcome) -> None:
        self.cases += 1
        self.by_rpc[case.rpc] += 1
        for answer in outcome.answers:
            self.answers[f"{case.rpc} {answer.code}"] += 1
        self.kinds[f"{case.kind} {outcome.verdict}"] += 1
        self.verdicts[outcome.verdict] += 1
        self.max_seconds = max(self.max_seconds, outcome.seconds)
        self.total_seconds += outcome.seconds
        if outcome.verdict in (FAILED, FLAGGED, HANG) and len(self.problems) < KEPT:
            self.problems.append({"rpc": case.rpc, "kind": case.kind, "how": list(case.how),
                                  "messages_hex": [m.hex() for m in case.messages],
                                  "verdict": outcome.verdict, "problem": outcome.problem,
                                  "answers": [asdict(a) for a in outcome.answers]})

    def as_json(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it rebuilds a Counter from its (key, count) pairs.
        return {"cases": self.cases, "by_rpc": dict(self.by_rpc), "answers": dict(self.answers),
                "kinds": dict(self.kinds), "verdicts": dict(self.verdicts),
                "max_seconds": round(self.max_seconds, 4),
                "total_seconds": round(self.total_seconds, 2), "problems": self.problems,
                "lost_server": self.lost_server}

    def merge(self, other: Tally) -> None:
        self.cases += other.cases
        for mine, theirs in ((self.by_rpc, other.by_rpc), (self.answers, other.answers),
                             (self.kinds, other.kinds), (self.verdicts, other.verdicts)):
            mine.update(theirs)
        self.max_seconds = max(self.max_seconds, other.max_seconds)
        self.total_seconds += other.total_seconds
        self.problems.extend(other.problems[:max(0, KEPT - len(self.problems))])
        self.lost_server = self.lost_server or other.lost_server


def lost_connection(outcome: Outcome) -> bool:
    return any(a.code == "UNAVAILABLE" and any(t in a.message.lower() for t in TRANSPORT)
               for a in outcome.answers)


def run_chunk(url: str, targets: list[Target], chunk_seed: int, count: int,
              timeout: float) -> Tally:
    """``count`` cases from one seeded hypothesis run (generation only: nothing shrinks,
    nothing is stored), each sent and tallied; stops early when the server is gone."""
    tally = Tally()
    with grpc.insecure_channel(url) as channel:
        client = FuzzClient(channel, timeout)

        @seed(chunk_seed)
        @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @given(st.data())
        def one(data: st.DataObject) -> None:
            if tally.lost_server:
                return
            case = data.draw(cases(targets))
            outcome = client.send(case)
            tally.add(case, outcome)
            tally.lost_server = lost_connection(outcome)

        one()
    return tally


def _chunk_task(args: tuple[str, list[Target], int, int, float]) -> Tally:
    return run_chunk(*args)


def answers_of(url: str, targets: Sequence[Target]) -> dict[str, str]:
    """Each model's answer to its valid request, as hex (the models are deterministic)."""
    with grpc.insecure_channel(url) as channel:
        infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
        return {t.name: infer(valid_request(t), timeout=30).hex() for t in targets}


def server_live(url: str) -> bool:
    with grpc.insecure_channel(url) as channel:
        stub = pb_grpc.GRPCInferenceServiceStub(channel)
        try:
            return bool(stub.ServerLive(pb.ServerLiveRequest(), timeout=10).live)
        except grpc.RpcError:
            return False


def fuzz(server: ServerProcess, targets: list[Target], total: int, workers: int, chunk: int,
         timeout: float, base_seed: int) -> tuple[Tally, bool, int]:
    """(tally, crashed, chunks run)."""
    sizes = [min(chunk, total - start) for start in range(0, total, chunk)]
    tasks = [(server.url, targets, base_seed + i, size, timeout) for i, size in enumerate(sizes)]
    tally = Tally()
    crashed = False
    done = 0
    started = time.monotonic()
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        for result in pool.imap_unordered(_chunk_task, tasks):
            tally.merge(result)
            done += 1
            crashed = not server.running()
            rate = tally.cases / (time.monotonic() - started)
            print(f"chunk {done}/{len(tasks)}: {tally.cases:,} cases ({rate:.0f}/s), "
                  f"verdicts {dict(tally.verdicts)}", file=sys.stderr, flush=True)
            if crashed or result.lost_server:
                pool.terminate()
                break
    return tally, crashed, done


def write_section(document: dict[str, Any]) -> None:
    tally = document["tally"]
    lines = section_header(SECTION, document)
    lines += [
        f"A `peregrine serve` subprocess on {document['repository']} "
        f"({', '.join(document['models'])}) with one shared-memory region registered; "
        f"{document['workers']} client processes, each "
        f"case a hypothesis example of bench/fuzz/strategies.py (seeds {document['seed']}.."
        f"{document['seed'] + document['chunks'] - 1}, {document['chunk']} cases each), "
        f"per-call timeout {document['timeout_s']:g} s. A case is one unary ModelInfer or one "
        "ModelStreamInfer of 1-4 requests (each answered in-band).", "",
        f"- cases: **{tally['cases']:,}** ({tally['by_rpc'].get('unary', 0):,} unary, "
        f"{tally['by_rpc'].get('stream', 0):,} streams) in {document['wall_s']:.0f} s",
        f"- crashes (server process died): **{int(document['crashed'])}**",
        f"- hangs (no answer within {document['timeout_s']:g} s): "
        f"**{tally['verdicts'].get(HANG, 0)}**",
        f"- improper statuses (UNKNOWN, CANCELLED, a detailed INTERNAL, a malformed answer, "
        f"answers missing on a stream): **{tally['verdicts'].get(FAILED, 0)}**",
        f"- INTERNAL with a correlation id only (flagged): **{tally['verdicts'].get(FLAGGED, 0)}**",
        f"- after the run: server alive **{document['alive_after']}**, ServerLive "
        f"**{document['live_after']}**, every model's valid request answered as before "
        f"**{document['same_answers_after']}**",
        f"- slowest call {tally['max_seconds'] * 1e3:.1f} ms, mean "
        f"{tally['total_seconds'] / max(1, tally['cases']) * 1e3:.1f} ms", "",
        "Answers by status (a stream answers each of its requests):", "",
    ]
    codes = sorted({key.split(" ", 1)[1] for key in tally["answers"]})
    rows = [[code, *(f"{tally['answers'].get(f'{rpc} {code}', 0):,}"
                     for rpc in ("unary", "stream"))] for code in codes]
    lines += [markdown_table(["status", "unary", "stream"], rows), "",
              "Cases by how they were made (a stream carries requests of every kind) and verdict:",
              ""]
    kinds = sorted({key.rsplit(" ", 1)[0] for key in tally["kinds"]})
    verdicts = ["ok", FLAGGED, FAILED, HANG]
    rows = [[kind, *(f"{tally['kinds'].get(f'{kind} {v}', 0):,}" for v in verdicts)]
            for kind in kinds]
    lines += [markdown_table(["kind", *verdicts], rows), ""]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=2000)
    parser.add_argument("--timeout", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repository", type=Path, default=None)
    parser.add_argument("--server-cpus", default=None)
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    repository = args.repository or ensure_examples(EXAMPLE_MODELS)
    started = time.monotonic()
    with PeregrineProcess(repository, cpus=args.server_cpus,
                          extra_args=["--allow-client-shm", "true"]) as server, \
            grpc.insecure_channel(server.url) as channel, registered_region(channel):
        targets = discover(channel)
        before = answers_of(server.url, targets)
        tally, crashed, chunks = fuzz(server, targets, args.cases, args.workers, args.chunk,
                                      args.timeout, args.seed)
        alive = server.running()
        live = alive and server_live(server.url)
        same = live and answers_of(server.url, targets) == before
        if not alive:
            print(server.log_tail(), file=sys.stderr)
    document = {
        "benchmark": "fuzz_server",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.studies.fuzz_server "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(None),
        "repository": str(repository.resolve().relative_to(Path.cwd().resolve()))
        if repository.resolve().is_relative_to(Path.cwd().resolve()) else str(repository),
        "models": [t.name for t in targets],
        "requested_cases": args.cases, "workers": args.workers, "chunk": args.chunk,
        "chunks": chunks, "seed": args.seed, "timeout_s": args.timeout,
        "crashed": crashed, "alive_after": alive, "live_after": live,
        "same_answers_after": same,
        "tally": tally.as_json(),
        "wall_s": round(time.monotonic() - started, 1),
    }
    RESULTS_JSON.parent.mkdir(parents=True, exist_ok=True)
    RESULTS_JSON.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}", file=sys.stderr)
    clean = (not crashed and alive and live and same and tally.cases == args.cases
             and not (tally.verdicts[FAILED] or tally.verdicts[HANG]))
    return 0 if clean else 1


if __name__ == "__main__":
    raise SystemExit(main())
