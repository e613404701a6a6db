"""``peregrine optimize`` on the example MLP: size, latency and throughput at batch 1 and 32,
and accuracy, for each method beside the source version.

    python -m bench.studies.optimize [--threads 1] [--no-results-md]

Each method makes its version of ``examples/models/mlp_classifier`` version 1 in a scratch
copy of the repository, measured in process by the command's own code (ONNX Runtime, the same
threads for both files) on the held-out quarter of scikit-learn's digits (the split
``examples/build_models.py`` trains on the other three quarters of). Writes
bench/results/optimize.json and .png and the "Model optimisation" section of RESULTS.md.
"""

from __future__ import annotations

import datetime as dt
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.results_md import RESULTS_DIR, markdown_table, replace_section, section_header
from bench.studies.bar_chart import grouped_bars
from bench.studies.study_run import start_study, study_arguments, write_document

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "models" / "mlp_classifier"
RESULTS_JSON = RESULTS_DIR / "optimize.json"
RESULTS_PNG = RESULTS_DIR / "optimize.png"
METHODS = ("graph", "dynamic-int8", "static-int8", "fp16")


def held_out_digits(path: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    _, x_test, _, y_test = train_test_split(x.astype(np.float32), y.astype(np.int64),
                                            test_size=0.25, random_state=0, stratify=y)
    np.savez(path, input=x_test, labels=y_test)


def measure(threads: int) -> list[dict[str, Any]]:
    from server.app import open_model_offline
    from server.optimize import build

    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        repo = Path(scratch)
        shutil.copytree(EXAMPLE, repo / "mlp_classifier", ignore=shutil.ignore_patterns("2"))
        digits = repo / "digits.npz"
        held_out_digits(digits)
        spec, _ = open_model_offline(repo, "mlp_classifier")
        for method in METHODS:
            report = build.run(build.Request(repository=repo, spec=spec, version="1",
                                             method=method, calibration=digits, eval=digits,
                                             threads=threads))
            if not rows:
                rows.append(_row("source (fp32)", report.source, None))
            rows.append(_row(method, report.candidate, report.comparison.top1_agreement))
    return rows


def _row(name: str, figures: Any, agreement: float | None) -> dict[str, Any]:
    speed = {s.batch: s for s in figures.speeds}
    return {"version": name, "size_bytes": figures.size_bytes,
            "latency_ms_b1": round(speed[1].latency_ms, 4),
            "latency_ms_b32": round(speed[32].latency_ms, 4),
            "rows_per_s_b1": round(speed[1].rows_per_s),
            "rows_per_s_b32": round(speed[32].rows_per_s),
            "accuracy": round(figures.accuracy, 4), "top1_agreement": agreement}


def main(argv: Sequence[str] | None = None) -> int:
    parser = study_arguments(__doc__, repeats=1, pinned=False)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    run = start_study("bench.studies.optimize", argv, "", "")
    rows = measure(args.threads)
    document = {"date": dt.date.today().isoformat(), **run.record(), "threads": args.threads,
                "rows": rows}
    write_document(RESULTS_JSON, document)
    grouped_bars(RESULTS_PNG, [r["version"] for r in rows],
                 {"latency b1 (us)": [r["latency_ms_b1"] * 1e3 for r in rows],
                  "latency b32 (us)": [r["latency_ms_b32"] * 1e3 for r in rows],
                  "size (KiB)": [r["size_bytes"] / 1024 for r in rows]},
                 "us / KiB", "peregrine optimize on the example MLP (in process, ONNX Runtime)")
    table = markdown_table(
        ("version", "size", "latency b1", "latency b32", "rows/s b1", "rows/s b32",
         "accuracy", "top-1 agreement"),
        [(r["version"], f"{r['size_bytes'] / 1024:.1f} KiB", f"{r['latency_ms_b1'] * 1e3:.1f} us",
          f"{r['latency_ms_b32'] * 1e3:.1f} us", f"{r['rows_per_s_b1']:,}",
          f"{r['rows_per_s_b32']:,}", f"{r['accuracy']:.4f}",
          "" if r["top1_agreement"] is None else f"{r['top1_agreement']:.4f}") for r in rows])
    print(table)
    if not args.no_results_md:
        load = document["loadavg"]
        replace_section("\n".join([
            *section_header("## Model optimisation (peregrine optimize)", document),
            f"Example MLP version 1 and each method's version, in process, {args.threads} "
            f"ONNX Runtime thread(s), the 450 held-out digits; 1-minute load "
            f"average {load[0]} at start, {load[1]} at end (a shared 2-core machine: the "
            "latencies are indicative; sizes and accuracies are exact).", "",
            table, "", "![optimize](results/optimize.png)", "",
        ]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
