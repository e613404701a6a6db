"""Retrain ``mlp_classifier`` on its stored drift windows and publish the next version.

Usage, as Peregrine's retrain hook (the payload arrives on stdin)::

    peregrine serve ... --retrain-command "python examples/retrain_mlp.py"

or by hand::

    python examples/retrain_mlp.py --repository examples/models [--labels labels.csv]

It reads the rows the drift sample store kept for the version that drifted (the payload's
``store.directory``, else ``<repository>/.drift/mlp_classifier/<version>``), adds them to the
load_digits training set, trains a new MLP with examples/build_models.py's ``train_mlp`` and
writes ``<repository>/mlp_classifier/<next>/model.onnx`` through a hidden temporary directory
renamed into place, so a server polling the repository loads it whole. Labels come from
``--labels`` (a CSV of ``request_id,label``, e.g. from a feedback system); without it the
served model's own answers (the stored ``label`` column) stand in, which only shows the
loop: real retraining needs real labels. The new version is then compared before rollout
(``peregrine optimize --rollout`` or ``peregrine route``: see docs/operations.md).
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_models import (  # the sibling script, not a package
    DIGITS_FEATURES,
    Digits,
    load_digits_split,
    train_mlp,
    write_version_dir,
)

MODEL = "mlp_classifier"


def stored_rows(store: Path, labels: dict[str, int] | None) -> tuple[np.ndarray, np.ndarray]:
    """The stored windows' inputs and their labels (given, else the served answers)."""
    from server.drift.store import read_windows

    xs, ys = [], []
    for window in read_windows(store):
        columns = window.columns
        x = np.column_stack([np.asarray(columns[f"input[{i}]"], dtype=np.float32)
                             for i in range(DIGITS_FEATURES)])
        if labels is not None:
            ids = [str(i) for i in columns["request_id"]]
            keep = np.asarray([i in labels for i in ids])
            y = np.asarray([labels[i] for i in ids if i in labels], dtype=np.int64)
            x = x[keep]
        else:
            y = np.asarray(columns["label"], dtype=np.int64)
        xs.append(x)
        ys.append(y)
    if not xs:
        raise SystemExit(f"no stored windows in {store}")
    return np.concatenate(xs), np.concatenate(ys)


def next_version(model_dir: Path) -> int:
    return max((int(p.name) for p in model_dir.iterdir() if p.name.isdigit()), default=0) + 1


def retrain(repository: Path, store: Path, labels: dict[str, int] | None,
            seed: int = 0) -> tuple[Path, float, int]:
    """Train on load_digits plus the stored rows; returns the new version's directory, the
    test accuracy and the number of stored rows used."""
    x, y = stored_rows(store, labels)
    base = load_digits_split()
    data = Digits(np.concatenate([base.x_train, x]), base.x_test,
                  np.concatenate([base.y_train, y]), base.y_test)
    version = next_version(repository / MODEL)
    model, accuracy = train_mlp(version, seed, digits=data)
    onnx.checker.check_model(model, full_check=True)
    path = write_version_dir(repository, MODEL, version, {"model.onnx": model.SerializeToString()})
    return path, accuracy, int(x.shape[0])


def read_labels(path: Path) -> dict[str, int]:
    with path.open(newline="") as handle:
        return {row["request_id"]: int(row["label"]) for row in csv.DictReader(handle)}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path,
                        help="the model repository (default: the payload's)")
    parser.add_argument("--version", default="1", help="the drifted version (default: 1)")
    parser.add_argument("--store", type=Path, help="its stored windows (default: the "
                        "payload's, else <repository>/.drift/mlp_classifier/<version>)")
    parser.add_argument("--labels", type=Path, help="CSV of request_id,label")
    args = parser.parse_args(argv)
    payload = {} if sys.stdin.isatty() else json.loads(sys.stdin.read() or "{}")
    if payload and payload.get("model") != MODEL:
        print(f"not {MODEL}: nothing to do", file=sys.stderr)
        return 0
    repository = args.repository or Path(payload["repository"])
    version = payload.get("version", args.version)
    store = args.store or (Path(payload["store"]["directory"]) if payload.get("store")
                           else repository / ".drift" / MODEL / version)
    labels = read_labels(args.labels) if args.labels else None
    path, accuracy, rows = retrain(repository, store, labels)
    print(f"published {path} (trained with {rows} stored rows of version {version}; "
          f"test accuracy {accuracy:.4f})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
