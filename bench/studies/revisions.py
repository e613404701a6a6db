"""An earlier revision of the server beside this tree, for studies that compare the two
alternately on the same machine (a fresh server of each, round by round): the machine's speed
swings more between runs minutes apart than most changes move a figure."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.compare.servers import ServerProcess, free_port
from bench.loadgen.environment import REPO_ROOT
from bench.studies.study_run import study_arguments

#: What the baseline's tree must share with this one: it runs with this tree's builds.
BUILT_FROM = ("csrc", "proto", "setup.py")


def git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          check=True)
    return done.stdout.strip()


@contextmanager
def baseline_tree(revision: str) -> Iterator[Path]:
    """A worktree of ``revision`` with this tree's native extension and protobuf modules."""
    changed = subprocess.run(["git", "diff", "--quiet", revision, "--", *BUILT_FROM],
                             cwd=REPO_ROOT, check=False).returncode
    if changed:
        raise SystemExit(f"{revision} differs from this tree in {', '.join(BUILT_FROM)}: "
                         "its server needs its own build")
    folder = Path(tempfile.mkdtemp(prefix="baseline-")) / "tree"
    git("worktree", "add", "--detach", str(folder), revision)
    try:
        built = [*(REPO_ROOT / "server").glob("_native*.so"),
                 *(REPO_ROOT / "server" / "_pb").glob("*_pb2*.py")]
        for path in built:
            shutil.copy2(path, folder / path.relative_to(REPO_ROOT))
        yield folder
    finally:
        git("worktree", "remove", "--force", str(folder))
        shutil.rmtree(folder.parent, ignore_errors=True)


def server_at(root: Path, repository: Path, cpus: str | None, *flags: str) -> ServerProcess:
    """``peregrine serve`` on ``repository`` from the tree at ``root`` (this tree, or a
    baseline's: the tree the server's modules are imported from is its working folder)."""
    port = free_port()
    argv = [sys.executable, "-m", "server.cli", "serve", "--model-repository", str(repository),
            "--grpc-port", str(port), "--metrics-port", "0", "--log-level", "error", *flags]
    return ServerProcess(root.name, argv, port, cpus, cwd=root)


def revision_arguments(doc: str | None) -> argparse.ArgumentParser:
    """A comparing study's parser: every study's options (four rounds by default) and
    --baseline, the revision to compare with."""
    parser = study_arguments(doc, repeats=4)
    parser.add_argument("--baseline", required=True, help="the git revision to compare with")
    return parser


def closing_lines(document: dict[str, Any], chart: Path, data: Path, alt: str) -> list[str]:
    """A comparing study's last lines in RESULTS.md: the load average, its chart and data."""
    return ["", f"Load average (1 min) at the start and the end: {document['loadavg'][0]:.2f} "
            f"and {document['loadavg'][1]:.2f}.", "",
            f"![{alt}](results/{chart.name}) · data: [results/{data.name}](results/{data.name})",
            ""]
