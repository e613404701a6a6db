"""The rows ``peregrine optimize`` feeds a model: calibration data, the evaluation set and its
labels. Files are read as ``peregrine drift profile`` reads reference data
(``server/drift/datafile.py``); without a file, calibration rows come from the source
version's drift reference profile (``<version>/reference/profile.json``)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from server.drift import datafile
from server.drift import profile as profiles
from server.spec import ModelSpec
from server.types import Array

LABELS_KEY = "labels"


def inputs(path: Path, spec: ModelSpec) -> dict[str, Array]:
    """The model's inputs from a data file (outputs in the file are left out)."""
    data = datafile.load(path, spec)
    return {t.name: data[t.name] for t in spec.inputs if t.name in data}


def labels(path: Path) -> Array:
    """A labels file: an .npy, or an .npz holding an array ``labels`` or only one array."""
    if path.suffix.lower() == ".npy":
        return np.asarray(np.load(path, allow_pickle=False))
    if path.suffix.lower() == ".npz":
        with np.load(path, allow_pickle=False) as data:
            if LABELS_KEY in data.files or len(data.files) == 1:
                return np.asarray(data[LABELS_KEY if LABELS_KEY in data.files
                                       else data.files[0]])
    raise ValueError(f"{path}: labels come in an .npy, or an .npz with an array "
                     f"'{LABELS_KEY}'")


def labels_beside(path: Path) -> Array | None:
    """The ``labels`` array of an evaluation .npz that carries its labels; None otherwise."""
    if path.suffix.lower() != ".npz":
        return None
    with np.load(path, allow_pickle=False) as data:
        return np.asarray(data[LABELS_KEY]) if LABELS_KEY in data.files else None


def from_profile(repository: Path, spec: ModelSpec, version: str,
                 seed: int = 0) -> tuple[dict[str, Array], str]:
    """Calibration rows drawn from the reference profile's per-feature samples, each feature
    shuffled on its own (the ranges the quantiser needs, not the features' correlations);
    and where they came from. ValueError when there is no usable profile."""
    path = profiles.profile_path(repository, spec.name, version)
    if not path.is_file():
        raise ValueError(f"no calibration data: give --calibration FILE (version {version} "
                         f"has no drift reference profile {path})")
    reference = profiles.load(path)
    rng = np.random.default_rng(seed)
    rows: dict[str, Array] = {}
    for tensor in spec.inputs:
        found = reference.tensor(tensor.name)
        samples: list[Array] = [np.asarray(getattr(f, "sample", ())) for f in found.features] \
            if found else []
        if (not samples or any(len(s) == 0 for s in samples)
                or any(d <= 0 for d in tensor.dims) or len(samples) != math.prod(tensor.dims)):
            raise ValueError(f"no calibration data: the reference profile {path} has no "
                             f"numeric sample of every element of input '{tensor.name}'; "
                             "give --calibration FILE")
        count = min(len(s) for s in samples)
        columns = [rng.permutation(np.asarray(s))[:count] for s in samples]
        matrix = np.stack(columns, axis=1).reshape((count, *tensor.dims))
        rows[tensor.name] = matrix.astype(tensor.datatype.numpy_dtype)
    return rows, f"drift reference profile of version {version} ({reference.source or path})"


def random_inputs(spec: ModelSpec, rows: int = 256, seed: int = 0) -> dict[str, Array]:
    """Uniform [0, 1) rows of every input (variable dims as 1): for timing and agreement when
    no data is given."""
    rng = np.random.default_rng(seed)
    out: dict[str, Array] = {}
    for tensor in spec.inputs:
        shape = (rows, *(d if d > 0 else 1 for d in tensor.dims))
        out[tensor.name] = rng.random(shape).astype(tensor.datatype.numpy_dtype)
    return out
