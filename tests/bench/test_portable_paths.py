"""Result files record paths relative to the checkout (or a bare name): no machine's paths go
into the repository."""

from __future__ import annotations

import re
import subprocess

from bench.loadgen.environment import REPO_ROOT, portable


def test_paths_become_relative_to_the_checkout_or_their_name() -> None:
    assert portable(str(REPO_ROOT / "bench" / "results" / "x.json")) == "bench/results/x.json"
    assert portable("/tmp/bench-abc123/cnn.npz") == "cnn.npz"
    assert portable("--json") == "--json"
    assert portable("relative/file.json") == "relative/file.json"


def test_committed_results_hold_no_absolute_paths_of_a_machine() -> None:
    tracked = subprocess.run(["git", "ls-files", "bench/results", "bench/RESULTS.md"],
                             cwd=REPO_ROOT, capture_output=True, text=True, check=True)
    machine_path = re.compile(r'"(/tmp/|/home/|/root/|/work/)')
    found = []
    for name in tracked.stdout.split():
        if name.endswith((".json", ".md")):
            text = (REPO_ROOT / name).read_text(encoding="utf-8")
            found += [f"{name}: {m.group(0)}" for m in machine_path.finditer(text)]
    assert not found, "\n".join(found[:10])
