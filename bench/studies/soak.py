"""Soak: mixed load, faults and changes against one server for ``--minutes`` (default 10),
watching the server's memory and file descriptors.

A ``peregrine serve`` subprocess (poll mode, ``--allow-client-shm true``, pinned to CPU 0
with ``taskset`` where there is one) serves copies of the example models, each with one ONNX
Runtime intra-op thread: ``mlp_classifier`` (version policy ``latest 1``, drift sampling on
20 % of its requests against a reference profile per version) whose version changes every
``--swap-every`` seconds, ``mlp_routed`` (both versions) whose routing table changes every
``--route-every`` seconds, ``cnn``, ``image_classifier`` and ``text_encoder``. This process,
pinned to CPU 1, runs the clients of :mod:`bench.studies.soak_load` in threads: unary and
streamed requests to every model (answers checked), shared-memory register / infer /
unregister cycles, requests that must fail (wrong shape, unknown model, past
``--max-request-bytes``), the swaps and the route changes. Every ``--sample-every`` seconds
it reads the server's VmRSS, open descriptors and threads from /proc.

Goals: no unexpected status (an UNAVAILABLE during a swap included), RSS growth under 5 %
from the end of the warm-up (the first ``--warmup-fraction`` of the run) to the end, and a
flat descriptor count. Results: ``bench/results/soak.json``, ``soak.png`` and the "Soak"
section of ``bench/RESULTS.md`` (replaced in place)::

    .venv/bin/python -m bench.studies.soak [--minutes 10]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from bench.compare.model_repo import ORT_PARAMETERS, ensure_examples, set_parameters
from bench.compare.servers import PeregrineProcess, free_port
from bench.loadgen.cpu import pin_self
from bench.loadgen.environment import environment, machine
from bench.results_md import RESULTS_DIR, RESULTS_MD, replace_section
from bench.studies import soak_load as load
from bench.studies.drift_overhead import digits, drift_counters
from bench.studies.shm_vs_raw import load_shared_memory_utils
from bench.studies.soak_report import markdown, plot, summarise

SWAPPED = "mlp_classifier"
ROUTED = "mlp_routed"
OTHERS = ("cnn", "image_classifier", "text_encoder")
DRIFT_RATE = "0.2"
#: --max-request-bytes of the server: the oversize requests go just past it.
MAX_REQUEST_BYTES = 1 << 20


# -- the repository ----------------------------------------------------------------------------


def _configure(model_dir: Path, name: str, policy: str, extra: dict[str, str]) -> None:
    config = model_dir / "config.pbtxt"
    text = re.sub(r'^name:\s*".*"$', f'name: "{name}"', config.read_text(), flags=re.MULTILINE)
    text, count = re.subn(r"^version_policy\s*:.*$", f"version_policy: {{ {policy} }}", text,
                          flags=re.MULTILINE)
    if count != 1:
        raise RuntimeError(f"{config}: expected one version_policy line to rewrite")
    config.write_text(set_parameters(text, {**ORT_PARAMETERS, **extra}))


def prepare_repository(root: Path, sources: Path) -> list[Path]:
    """The models under ``root``; returns the version directories the swapped model's
    versions are copied from (each with its drift reference profile), kept in ``sources``."""
    examples = ensure_examples([SWAPPED, *OTHERS])
    swapped = root / SWAPPED
    shutil.copytree(examples / SWAPPED, swapped)
    _configure(swapped, SWAPPED, "latest { num_versions: 1 }", {"drift_sample_rate": DRIFT_RATE})
    shutil.copytree(examples / SWAPPED, root / ROUTED)
    _configure(root / ROUTED, ROUTED, "all { }", {})
    for name in OTHERS:
        shutil.copytree(examples / name, root / name)
        config = root / name / "config.pbtxt"
        config.write_text(set_parameters(config.read_text(), ORT_PARAMETERS))
    data = sources / "reference.npz"
    np.savez(data, input=digits(np.random.default_rng(1), 5000))
    from server.cli import main as peregrine

    kept = []
    for version in sorted(p.name for p in swapped.iterdir() if p.name.isdigit()):
        code = peregrine(["drift", "profile", "--model", SWAPPED, "--version", version,
                          "--data", str(data), "--repository", str(root)])
        if code != 0:
            raise RuntimeError(f"peregrine drift profile of version {version} failed")
        kept.append(sources / f"v{version}")
        shutil.move(swapped / version, kept[-1])
    shutil.copytree(kept[0], swapped / "1")
    return kept


def cnn_answer(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(ensure_examples(["cnn"]) / "cnn" / "1" / "model.onnx"),
                                   options, providers=["CPUExecutionProvider"])
    answer: np.ndarray[Any, Any] = session.run(["scores"], {"image": image})[0]
    return answer


# -- the server's footprint --------------------------------------------------------------------


def footprint(pid: int) -> dict[str, int]:
    """VmRSS (KiB) and threads from /proc/<pid>/status, and the open descriptors."""
    fields = dict(line.split(":", 1)
                  for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                  if ":" in line)
    return {"rss_kib": int(fields["VmRSS"].split()[0]), "threads": int(fields["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


# -- the run -----------------------------------------------------------------------------------


def soak(args: argparse.Namespace, url: str, pid: int, root: Path, sources: list[Path]
         ) -> tuple[load.Tally, list[dict[str, Any]], list[dict[str, float | int]]]:
    """Run every client for ``args.minutes``; returns the tally, the samples and the swaps."""
    tally, stop = load.Tally(), threading.Event()
    image = np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32)
    mix = load.requests(cnn_answer(image), image, SWAPPED, ROUTED)
    swapper = load.Swapper("swapper", url, tally, stop, root / SWAPPED, 1, sources,
                           args.swap_every)
    workers: list[load.Worker] = [
        *(load.Unary(f"unary-{i}", url, tally, stop, mix) for i in range(args.unary_threads)),
        load.Streamed("stream", url, tally, stop, mix),
        load.SharedMemory("shm", url, tally, stop, load_shared_memory_utils(), image,
                          mix["cnn"]),
        load.Errors("errors", url, tally, stop, SWAPPED, MAX_REQUEST_BYTES),
        swapper,
        load.Router("router", url, tally, stop, ROUTED, args.route_every),
    ]
    samples: list[dict[str, Any]] = []

    def sample() -> None:
        counts = tally.snapshot()
        samples.append({"t_s": round(time.monotonic() - tally.started, 2), **footprint(pid),
                        "counts": {f"{kind}|{status}": n for (kind, status), n in counts.items()}})

    sample()
    for worker in workers:
        worker.start()
    end = tally.started + args.minutes * 60
    while (left := end - time.monotonic()) > 0:
        time.sleep(min(args.sample_every, left))
        sample()
    stop.set()
    for worker in workers:
        worker.join(timeout=2 * load.TIMEOUT_S + load.SWAP_TIMEOUT_S)
        if worker.is_alive():
            tally.count(f"crash/{worker.name}", "HUNG", "did not stop")
    return tally, samples, swapper.swaps


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the run")
    parser.add_argument("--warmup-fraction", type=float, default=0.2,
                        help="part of the run before the memory baseline")
    parser.add_argument("--swap-every", type=float, default=30.0, help="seconds between swaps")
    parser.add_argument("--route-every", type=float, default=3.0,
                        help="seconds between route changes")
    parser.add_argument("--sample-every", type=float, default=5.0,
                        help="seconds between readings of the server's /proc")
    parser.add_argument("--unary-threads", type=int, default=2)
    parser.add_argument("--server-cpus", default="0", help="taskset CPU list ('' for none)")
    parser.add_argument("--client-cpus", default="1", help="CPUs of this client ('' for any)")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "soak.json")
    parser.add_argument("--no-results-md", action="store_true",
                        help="do not update bench/RESULTS.md")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.studies.soak", *(argv or sys.argv[1:])])
    multi_cpu = len(os.sched_getaffinity(0)) > 1
    this_machine = machine()  # before pinning: nproc counts the CPUs we may use
    load_at_start = os.getloadavg()[0]
    server_cpus = args.server_cpus if multi_cpu and args.server_cpus else None
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        root, kept = Path(tmp) / "models", Path(tmp) / "sources"
        root.mkdir()
        kept.mkdir()
        sources = prepare_repository(root, kept)
        metrics_port = free_port()
        extra = ["--model-control-mode", "poll", "--repository-poll-secs", "5",
                 "--allow-client-shm", "true", "--max-request-bytes", str(MAX_REQUEST_BYTES),
                 "--state-file", str(Path(tmp) / "state.json"),
                 "--metrics-port", str(metrics_port)]
        with PeregrineProcess(root, cpus=server_cpus, name="peregrine-soak",
                              extra_args=extra) as server:
            client_cpus = pin_self(args.client_cpus) if multi_cpu else sorted(
                os.sched_getaffinity(0))
            tally, samples, swaps = soak(args, server.url, server.pid, root, sources)
            # The serving version's counters: a replaced version's series go with it.
            drift = drift_counters(f"http://127.0.0.1:{metrics_port}/metrics")
            env = {**environment(server.pid), "machine": this_machine}
    document = {
        "kind": "soak",
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "settings": {
            "minutes": args.minutes, "warmup_fraction": args.warmup_fraction,
            "swap_every_s": args.swap_every, "route_every_s": args.route_every,
            "sample_every_s": args.sample_every, "unary_threads": args.unary_threads,
            "drift_sample_rate": float(DRIFT_RATE), "max_request_bytes": MAX_REQUEST_BYTES,
            "server_cpus": server_cpus or "any", "client_cpus": ",".join(map(str, client_cpus)),
        },
        "environment": env,
        "loadavg": [round(load_at_start, 2), round(os.getloadavg()[0], 2)],
        "drift": drift,
        **summarise(tally, samples, swaps, args.minutes * 60 * args.warmup_fraction),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    png = args.out.with_suffix(".png")
    plot(document, png)
    if not args.no_results_md:
        replace_section(markdown(document))
    goals = document["goals"]
    print(f"requests: {document['totals']}; unexpected: {document['unexpected_errors']}")
    print(f"RSS {document['rss']['warm_mib']} -> {document['rss']['end_mib']} MiB "
          f"({document['rss']['growth_percent']:+.2f} %), fds {document['fds']['warm']} -> "
          f"{document['fds']['end']}, swaps {len(swaps)}, route changes "
          f"{document['route_changes']}; goals met: {goals}")
    print(f"wrote {args.out}, {png}" + ("" if args.no_results_md else f", {RESULTS_MD}"))
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
