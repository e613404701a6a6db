"""Where and with what a run happened: package versions, machine, git revision, pinning."""

from __future__ import annotations

import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.loadgen.cpu import affinity_of

PACKAGES = ("grpcio", "protobuf", "tritonclient", "numpy", "hdrhistogram", "uvloop",
            "onnxruntime", "matplotlib", "peregrine")
#: The source checkout this package runs from.
REPO_ROOT = Path(__file__).resolve().parents[2]


def portable(value: str) -> str:
    """A path as a result file records it: relative to the checkout, or only its name when it
    lies outside (a temporary folder), so that no machine's paths land in the repository.
    Anything that is not an absolute path is returned as it is."""
    path = Path(value)
    if not path.is_absolute():
        return value
    try:
        return str(path.relative_to(REPO_ROOT))
    except ValueError:
        return path.name


def package_versions(names: tuple[str, ...] = PACKAGES) -> dict[str, str]:
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict[str, Any]:
    try:
        nproc = int(subprocess.run(["nproc"], capture_output=True, text=True,
                                   check=True).stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        nproc = len(os.sched_getaffinity(0))
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count() or 0,
        "nproc": nproc,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "system": platform.system(),
        "arch": platform.machine(),
        # Other work on the machine skews every figure: say how busy it was.
        "load_average_1m": round(os.getloadavg()[0], 2),
    }


def git_revision(short: bool = False) -> str:
    args = ["git", "rev-parse", *(["--short"] if short else []), "HEAD"]
    try:
        out = subprocess.run(args, capture_output=True, text=True, check=True, cwd=REPO_ROOT)
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    revision = out.stdout.strip()
    try:
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, check=True,
                               cwd=REPO_ROOT).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        dirty = ""
    return revision + ("-dirty" if dirty else "")


def pinning(server_pid: int | None) -> dict[str, Any]:
    """The CPUs the generator and (when its pid is known) the server may run on."""
    cpus = list(range(os.cpu_count() or 1))
    generator = affinity_of(0) or []
    server = affinity_of(server_pid) if server_pid else None
    return {
        "generator_cpus": generator,
        "server_cpus": server,
        "generator_pinned": generator != cpus,
        "server_pinned": server is not None and server != cpus,
    }


def environment(server_pid: int | None) -> dict[str, Any]:
    return {
        "packages": package_versions(),
        "machine": machine(),
        "git_revision": git_revision(),
        "pinning": pinning(server_pid),
    }
