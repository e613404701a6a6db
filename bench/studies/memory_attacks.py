"""Memory attacks at the issue's sizes: the server's RSS stays under a stated bound and a
well-behaved client keeps being served.

Each attack runs against a fresh ``peregrine serve`` subprocess (pinned to CPU 0 with
``taskset``; this process, the attacker and the well-behaved client, on CPU 1) serving
``identity_fp32`` and ``ragged`` (bench/studies/attacks.py). The server's VmRSS is sampled
every 50 ms from /proc while the attack runs; the well-behaved client sends one [1, 16]
request at a time throughout, and its answers, failures and p99 are counted.

Attacks (``--only`` picks some):

- ``ragged``: 20 pairs of [1, 1, 30000] and [1, 30000, 1] at once (padded together, a pair
  would be a 7.2 GB batch);
- ``bytes_flood``: 20 messages of 11,000,000 two-byte BYTES elements (66 MB each, under the
  64 MiB message limit) to an unknown model, 4 at a time;
- ``unread_stream``: one stream writing 2,000 requests of 1 MiB and never reading;
- ``large_default``: 100 requests of 64 MiB of FP32 at once, default settings;
- ``large_raised``: the same with ``--grpc-max-message-bytes`` 65 MiB so they reach the
  server (the derived --max-queued-bytes is then 16 x 65 MiB);
- ``large_bounded``: the same with ``--max-queued-bytes 256 MiB`` as well.

The large attacks build one 64 MiB payload and send that bytes object 100 times; the
client's gRPC copies each message it sends, so this process may reach several GB.

Results: ``bench/results/memory_attacks.json`` and the "Memory attacks" section of
``bench/RESULTS.md``::

    .venv/bin/python -m bench.studies.memory_attacks [--bound-mib 500] [--only ragged,...]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from bench.compare.servers import NoopServer, PeregrineProcess
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section, section_header
from bench.studies import attacks
from bench.studies.rss import MIB, ProcessSampler
from bench.studies.study_run import start_study

SECTION = "## Memory attacks"
LARGE = 64 * MIB
RAISED = str(65 * MIB)


@dataclass(frozen=True)
class Attack:
    key: str
    label: str
    flags: tuple[str, ...]
    run: Callable[[str], Coroutine[Any, Any, Any]]
    #: The bare servicer's arguments for the floor of this attack (bench/compare/noop_server.py
    #: taking ModelInfer's message as bytes: what gRPC alone holds while it receives the
    #: attack's messages); None where the floor is not measured.
    floor: tuple[str, ...] | None = None


def _large(url: str) -> Coroutine[Any, Any, attacks.Outcome]:
    payload = attacks.fp32_request(attacks.IDENTITY, "INPUT0", (1, LARGE // 4))
    return attacks.concurrent(url, payload, 100, max_message_bytes=LARGE + MIB)


ATTACKS = (
    Attack("ragged", "20 ragged pairs [1,1,30000] + [1,30000,1] at once", (),
           lambda url: attacks.ragged_pairs(url, 20)),
    Attack("bytes_flood", "20 x 66 MB of 2-byte BYTES elements (11M each) to an unknown "
           "model, 4 at a time", (),
           lambda url: attacks.concurrent(url, attacks.bytes_flood_request(11_000_000), 20,
                                          max_message_bytes=LARGE, limit=4),
           floor=("--raw-infer",)),
    Attack("unread_stream", "one stream, 2,000 x 1 MiB requests written, no answer read", (),
           lambda url: attacks.unread_stream(url, 2000, MIB)),
    Attack("large_default", "100 x 64 MiB requests at once, default settings", (), _large,
           floor=("--raw-infer",)),
    Attack("large_raised", "100 x 64 MiB at once, --grpc-max-message-bytes 65 MiB",
           ("--grpc-max-message-bytes", RAISED), _large,
           floor=("--raw-infer", "--max-message-bytes", RAISED)),
    Attack("large_bounded", "100 x 64 MiB at once, --grpc-max-message-bytes 65 MiB "
           "--max-queued-bytes 256 MiB",
           ("--grpc-max-message-bytes", RAISED, "--max-queued-bytes", str(256 * MIB)), _large),
)


def run_attack(root: Path, attack: Attack, server_cpus: str | None,
               args: argparse.Namespace) -> dict[str, Any]:
    """A fresh server; the well-behaved client alone for ``args.settle`` s, then the attack;
    the client's figures are those of the requests it sent while the attack ran."""
    server = PeregrineProcess(root, cpus=server_cpus, name=f"peregrine-{attack.key}",
                              extra_args=attack.flags)
    with (server, ProcessSampler(server.pid, 0.05, args.kill_above_mib * MIB) as sampler,
          attacks.WellBehaved(server.url) as client):
        time.sleep(args.settle)
        idle = sampler.samples[-1].rss
        start = time.monotonic_ns()
        outcome = asyncio.run(attack.run(server.url))
        end = time.monotonic_ns()
    return {
        "attack": attack.key, "label": attack.label, "flags": list(attack.flags),
        "seconds": round((end - start) / 1e9, 2), "outcome": asdict(outcome),
        "rss_mib": _rss_mib(sampler, idle),
        "within_bound": sampler.peak() <= args.bound_mib * MIB and not sampler.killed,
        "killed_above_mib": args.kill_above_mib if sampler.killed else None,
        "well_behaved": client.served(start, end).summary(),
    }


def run_floor(attack: Attack, server_cpus: str | None,
              args: argparse.Namespace) -> dict[str, Any] | None:
    """The attack against the bare servicer (``attack.floor``): its RSS idle, peak and end."""
    if attack.floor is None:
        return None
    server = NoopServer(cpus=server_cpus, extra_args=attack.floor)
    with server, ProcessSampler(server.pid, 0.05, args.kill_above_mib * MIB) as sampler:
        time.sleep(args.settle)
        idle = sampler.samples[-1].rss
        asyncio.run(attack.run(server.url))
    return {**_rss_mib(sampler, idle),
            "killed_above_mib": args.kill_above_mib if sampler.killed else None}


def _rss_mib(sampler: ProcessSampler, idle: int) -> dict[str, float]:
    """A server's RSS in MiB: ``idle`` (bytes, before the attack), its peak and its last."""
    return {"idle": round(idle / MIB, 1), "peak": round(sampler.peak() / MIB, 1),
            "end": round(sampler.samples[-1].rss / MIB, 1)}


def _floor_text(floor: dict[str, Any] | None) -> str:
    if floor is None:
        return "—"
    killed = floor["killed_above_mib"]
    return (f"{floor['idle']:.0f} / {floor['peak']:.0f} / {floor['end']:.0f}"
            + (f" (killed past {killed} MiB)" if killed else ""))


def _outcome_text(outcome: dict[str, Any]) -> str:
    if "written" in outcome:
        return (f"{outcome['written']:,} written, then "
                + ("the writes stalled" if outcome["stalled"] else "all written"))
    codes = ", ".join(f"{code} {count}" for code, count in outcome["codes"].items())
    details = "; ".join(f"{code}: “{text}”" for code, text in outcome["details"].items())
    return codes + (f" ({details})" if details else "")


def markdown(document: dict[str, Any]) -> str:
    s = document["settings"]
    lines = [
        *section_header(SECTION, document),
        f"A fresh `peregrine serve` per attack on CPU {s['server_cpus']} (default settings "
        "unless the row says otherwise; `identity_fp32` and `ragged`, one ONNX Runtime "
        f"thread); the attacker and a well-behaved client on CPU {s['client_cpus']}. The "
        "well-behaved client sends one [1, 16] FP32 request at a time for the whole attack. "
        "RSS: the server's VmRSS sampled every 50 ms (idle: before the attack, after "
        f"{s['settle_s']} s of the well-behaved client). **Bound stated: {s['bound_mib']} MiB "
        "of server RSS.**",
        "",
        "Floor: the same attack, in the same run, against the bare grpc.aio servicer "
        "(bench/compare/noop_server.py --raw-infer: ModelInfer takes the message's bytes, "
        "never parsed, and answers a fixed response), so what gRPC alone holds while it "
        "receives the messages.",
        "",
        "| attack | what the attacker got | RSS idle / peak / end MiB | within "
        f"{s['bound_mib']} MiB | floor: bare servicer RSS idle / peak / end MiB "
        "| well-behaved client: answers, failures, p99 / max ms | s |",
        "|---|---|---:|---|---:|---|---:|",
    ]
    for r in document["attacks"]:
        rss, client = r["rss_mib"], r["well_behaved"]
        failed = sum(client["failed"].values())
        lines.append(
            f"| {r['label']} | {_outcome_text(r['outcome'])} "
            f"| {rss['idle']:.0f} / {rss['peak']:.0f} / {rss['end']:.0f} "
            f"| {'yes' if r['within_bound'] else '**no**'}"
            + (f" (killed by the study past {r['killed_above_mib']} MiB)"
               if r["killed_above_mib"] else "") + " "
            f"| {_floor_text(r.get('floor_rss_mib'))} "
            f"| {client['ok']:,}, {failed}"
            + (f" ({client['failed']})" if failed else "")
            + f", {client['p99_ms']} / {client['max_ms']} | {r['seconds']:.1f} |")
    lines += ["", "The server's RSS under the large attacks is what gRPC holds while it receives "
              "the messages: a unary call's whole message is received (and copied into Python "
              "bytes) before the handler, and so every bound, sees it; refused or admitted, "
              "each message being received counts.", "",
              f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} and "
              f"{document['loadavg'][1]:.2f} on {document['environment']['machine']['nproc']} "
              "CPUs shared with other work (latencies move with it; RSS does not).", "",
              "Data: [results/memory_attacks.json](results/memory_attacks.json)", ""]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--bound-mib", type=int, default=500, help="the RSS bound stated")
    parser.add_argument("--only", default="", help="attacks to run, comma-separated")
    parser.add_argument("--kill-above-mib", type=int, default=6144,
                        help="kill the server past this RSS (a safety on a shared machine)")
    parser.add_argument("--settle", type=float, default=2.0,
                        help="seconds of the well-behaved client before each attack")
    parser.add_argument("--server-cpus", default="0")
    parser.add_argument("--client-cpus", default="1")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "memory_attacks.json")
    parser.add_argument("--no-results-md", action="store_true")
    args = parser.parse_args(argv)
    keys = {a.key for a in ATTACKS}
    args.only = [k for k in args.only.split(",") if k] or [a.key for a in ATTACKS]
    if unknown := set(args.only) - keys:
        parser.error(f"unknown attacks {sorted(unknown)}; known: {sorted(keys)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    study = start_study("bench.studies.memory_attacks", argv, args.server_cpus, args.client_cpus)
    server_cpus = study.server_cpus
    results = []
    with tempfile.TemporaryDirectory(prefix="memory-attacks-") as tmp:
        root = attacks.attack_repository(Path(tmp))
        for attack in ATTACKS:
            if attack.key in args.only:
                result = run_attack(root, attack, server_cpus, args)
                result["floor_rss_mib"] = run_floor(attack, server_cpus, args)
                results.append(result)
                print(f"{attack.key}: {_outcome_text(result['outcome'])}; RSS "
                      f"{result['rss_mib']}; floor {result['floor_rss_mib']}; well-behaved "
                      f"{result['well_behaved']}", flush=True)
    document = {
        "kind": "memory_attacks",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        **study.record(),
        "settings": {"bound_mib": args.bound_mib, "settle_s": args.settle,
                     **study.pinning},
        "attacks": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
    if not args.no_results_md:
        replace_section(markdown(document))
    print(f"{document['elapsed_s']} s; wrote {args.out}"
          + ("" if args.no_results_md else f", {RESULTS_MD}"))
    return 0 if all(r["within_bound"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
