"""examples/retrain_mlp.py, run as the retrain hook runs it: the payload on stdin, a stored
window of mlp_classifier rows (with labels) in the sample store; a new version appears whole
and loads in ONNX Runtime."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
from sklearn.datasets import load_digits

from server.cli import main
from server.drift import profile as profiles
from server.drift.store import SampleStore
from server.drift.window import Block

ROOT = Path(__file__).resolve().parents[2]


def test_the_example_publishes_a_loadable_next_version(examples_repo: Path,
                                                        tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(examples_repo / "mlp_classifier", repo / "mlp_classifier")
    x, y = load_digits(return_X_y=True)
    np.savez(tmp_path / "reference.npz", input=x[:500].astype(np.float32))
    assert main(["drift", "profile", "--model", "mlp_classifier", "--version", "1",
                 "--data", str(tmp_path / "reference.npz"), "--repository", str(repo)]) == 0
    profile = profiles.load(profiles.profile_path(repo, "mlp_classifier", "1"))
    store_dir = repo / ".drift" / "mlp_classifier" / "1"
    rows = 120
    ids = np.asarray([f"req-{i}" for i in range(rows)], dtype=object)
    shifted = np.clip(x[500:500 + rows] + 3.0, 0, 16)  # brighter digits: the drift
    SampleStore(store_dir, 1 << 20, "npz").write(
        Block(rows, ids, {"input": shifted}), profile, {"model": "mlp_classifier"})
    labels = tmp_path / "labels.csv"
    labels.write_text("request_id,label\n" + "".join(
        f"req-{i},{y[500 + i]}\n" for i in range(rows)))
    payload = {"model": "mlp_classifier", "version": "1", "repository": str(repo),
               "store": {"directory": str(store_dir), "format": "npz"}}

    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "retrain_mlp.py"), "--labels", str(labels)],
        input=json.dumps(payload), capture_output=True, text=True, timeout=300, cwd=ROOT,
        check=False)
    assert done.returncode == 0, done.stderr
    assert f"trained with {rows} stored rows of version 1" in done.stdout
    model_dir = repo / "mlp_classifier"
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3", "config.pbtxt"]
    session = ort.InferenceSession(str(model_dir / "3" / "model.onnx"))
    label, probabilities = session.run(["label", "probabilities"],
                                       {"input": shifted[:8].astype(np.float32)})
    assert label.shape == (8, 1) and probabilities.shape == (8, 10)
    assert (model_dir / "config.pbtxt").read_text() == \
        (examples_repo / "mlp_classifier" / "config.pbtxt").read_text()
