"""``peregrine drift profile | report``.

Only argparse is imported at module level: ``peregrine serve`` must not pay for numpy, scipy
or matplotlib imports it does not use. How to open a model (parse its config, load a backend)
is passed in by the caller, so this module needs no concrete backend.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from server.interfaces import Backend
    from server.spec import ModelSpec
    from server.types import Array

    #: (repository, model) -> (completed spec, loader of one version's backend instance)
    ModelOpener = Callable[[Path, str], tuple[ModelSpec, Callable[[str], Backend]]]


def add_drift_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    drift = commands.add_parser(
        "drift", help="drift monitoring: reference profiles and reports",
        description="Reference profiles for drift monitoring, and reports of the windows the "
        "server sampled. See docs/operations.md, 'Drift monitoring'.",
    )
    sub = drift.add_subparsers(dest="drift_command", required=True)
    profile = sub.add_parser(
        "profile", help="compute a version's reference profile from data",
        description="Compute per-feature statistics of reference data (inputs, and outputs: "
        "taken from the file or computed by running the model in-process) and store them in "
        "<repository>/<model>/<version>/reference/profile.json.",
    )
    _common(profile)
    profile.add_argument("--data", type=Path, required=True,
                         help="reference data: .npz, .npy, .csv or .parquet (needs pyarrow)")
    profile.add_argument("--bins", type=int, default=10, help="quantile bins (default 10)")
    profile.add_argument("--max-categories", type=int, default=1000,
                         help="categories kept per categorical feature (default 1000)")
    profile.add_argument("--sample-size", type=int, default=2000,
                         help="values kept per feature for the KS test (default 2000)")
    profile.add_argument("--seed", type=int, default=0)
    report = sub.add_parser(
        "report", help="print the per-feature drift table and write a PNG",
        description="Evaluate the newest sampled rows in the sample store against the "
        "reference profile; print features worst first and write a PNG of the most drifted "
        "features' histograms and the drift score over time.",
    )
    _common(report)
    report.add_argument("--rows", type=int, default=None,
                        help="newest rows to evaluate (default: the model's drift_window)")
    report.add_argument("--png", type=Path, default=None,
                        help="where to write the picture (default drift-<model>-<version>.png)")
    report.add_argument("--top", type=int, default=4, help="features to draw (default 4)")
    report.add_argument("--store", type=Path, default=None,
                        help="the version's window directory, if not where the config says")
    from server.cli.drift_status import add_status_parser

    add_status_parser(sub)


def _common(parser: argparse.ArgumentParser) -> None:
    from server.settings import default_repository

    parser.add_argument("--model", required=True)
    parser.add_argument("--version", default="",
                        help="model version (default: the highest on disk / with samples)")
    parser.add_argument("--repository", type=Path, default=None,
                        help=f"model repository (default {default_repository()})")


def run_drift(args: argparse.Namespace, open_model: ModelOpener) -> int:
    from server.errors import PeregrineError
    from server.settings import default_repository

    if args.drift_command == "status":
        from server.cli.drift_status import run_status

        return run_status(args)
    repository = args.repository or default_repository()
    try:
        if args.drift_command == "profile":
            return _profile(args, repository, open_model)
        return _report(args, repository, open_model)
    except (ValueError, OSError, PeregrineError) as exc:
        print(f"peregrine drift {args.drift_command}: {exc}", file=sys.stderr)
        return 2


def _versions(model_dir: Path) -> list[str]:
    if not model_dir.is_dir():
        raise ValueError(f"no model directory {model_dir}")
    return sorted((p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit()),
                  key=int)


def _profile(args: argparse.Namespace, repository: Path, open_model: ModelOpener) -> int:
    from server.drift import datafile, features
    from server.drift import options as drift_config
    from server.drift import profile as profiles

    spec, load_backend = open_model(repository, args.model)
    versions = _versions(repository / args.model)
    version = args.version or (versions[-1] if versions else "")
    if version not in versions:
        raise ValueError(f"model '{args.model}' has no version '{version}' on disk")
    config = drift_config.parse(spec.parameters, spec.name)
    layouts = features.layouts(spec, config)
    data = datafile.load(args.data, spec)
    missing = [t.name for t in layouts if t.name not in data]
    if missing:
        backend = load_backend(version)
        try:
            data.update(_run_model(backend, spec, data))
        finally:
            backend.close()
    built = profiles.build(
        spec.name, version, layouts, data, source=str(args.data),
        options=profiles.ProfileOptions(bins=args.bins, max_categories=args.max_categories,
                                        sample_size=args.sample_size, seed=args.seed),
    )
    path = profiles.profile_path(repository, spec.name, version)
    profiles.save(built, path)
    ran = " (outputs computed by running the model)" if missing else ""
    print(f"profiled {built.rows} rows, {built.feature_count} features of "
          f"{len(built.tensors)} tensors{ran} -> {path}")
    return 0


def _run_model(backend: Backend, spec: ModelSpec, data: dict[str, Array]) -> dict[str, Array]:
    """The model's outputs for the reference rows, in batches it accepts."""
    import numpy as np

    inputs = {t.name: data[t.name] for t in spec.inputs if t.name in data}
    rows = next(iter(inputs.values())).shape[0]
    step = spec.max_batch_size if spec.batches else 1
    parts: dict[str, list[Array]] = {}
    for start in range(0, rows, step):
        if spec.batches:
            chunk = {name: value[start:start + step] for name, value in inputs.items()}
        else:
            chunk = {name: value[start] for name, value in inputs.items()}
        for name, value in backend.execute(chunk).items():
            parts.setdefault(name, []).append(value if spec.batches else value[np.newaxis])
    return {name: np.concatenate(values) for name, values in parts.items()}


def _report(args: argparse.Namespace, repository: Path, open_model: ModelOpener) -> int:
    from server.drift import options as drift_config
    from server.drift import profile as profiles
    from server.drift import report as reports
    from server.drift.store import read_windows

    spec, _ = open_model(repository, args.model)
    config = drift_config.parse(spec.parameters, spec.name)
    version = args.version
    if not version:
        with_samples = [v for v in _versions(repository / args.model)
                        if read_windows(config.store_path(repository, spec.name, v))]
        if not with_samples:
            raise ValueError(f"no stored drift windows for model '{args.model}' under "
                             f"{repository / config.store_dir / spec.name}")
        version = with_samples[-1]
    store = args.store or config.store_path(repository, spec.name, version)
    windows = read_windows(store)
    if not windows:
        raise ValueError(f"no stored drift windows in {store}")
    reference = profiles.load(profiles.profile_path(repository, spec.name, version))
    built = reports.build(reference, windows, config.thresholds, args.rows or config.window)
    print(reports.table(built))
    png = args.png or Path(f"drift-{spec.name}-{version}.png")
    reports.plot(built, reference, png, top=args.top)
    print(f"picture: {png}")
    return 0
