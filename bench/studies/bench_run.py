"""One step of ``peregrine bench run`` against a server process, from a study: the load
generator pinned to its own CPUs, the step's figures back (the server's CPU summed over its
process tree, so frontend processes count)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.compare.servers import ServerProcess, pinned
from bench.loadgen.environment import REPO_ROOT


def drive(server: ServerProcess, model: str, rpc: str, concurrency: int, seconds: float,
          warmup: float, out: Path, client_args: Sequence[str] = (),
          client_cpus: str = "1") -> dict[str, Any]:
    argv = pinned([sys.executable, "-m", "bench", "run", "--url", server.url, "--model", model,
                   "--rpc", rpc, "--concurrency", str(concurrency), "--duration", str(seconds),
                   "--warmup", str(warmup), "--repeats", "1", "--server-pid", str(server.pid),
                   "--json", str(out), "--no-plot", "--progress", "never", *client_args],
                  client_cpus)
    done = subprocess.run(argv, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bench run failed ({rpc}):\n{done.stderr[-2000:]}")
    step = json.loads(out.read_text(encoding="utf-8"))["steps"][-1]
    cpu = step["server_cpu"] or {}
    return {"throughput_rps": round(step["throughput_rps"], 1),
            "p50_ms": round(step["latency_ms"]["p50"], 3),
            "p99_ms": round(step["latency_ms"]["p99"], 3),
            "server_cpu_us_per_request": cpu.get("us_per_request"),
            "server_cpu_percent": cpu.get("percent"),
            "errors": sum(step["errors"].values())}
