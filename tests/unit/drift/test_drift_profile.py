"""Reference profiles, feature extraction, reference data files and drift settings."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from server.drift import datafile, features
from server.drift import options as drift_config
from server.drift import profile as profiles
from server.drift.features import Kind, Role
from server.drift.profile import CategoricalProfile, NumericProfile
from server.errors import ModelLoadError
from server.spec import TensorSpec
from server.types import DataType
from tests.unit.drift.drift_kit import make_profile, make_spec


def test_numeric_profile_statistics(rng: np.random.Generator) -> None:
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (2,)),))
    x = np.column_stack([rng.normal(3.0, 2.0, 10_000), rng.integers(0, 3, 10_000)])
    x[:500, 0] = np.nan
    profile = make_profile(spec, {"x": x, "label": rng.integers(0, 4, (10_000, 1))})
    first, discrete = profile.tensors[0].features
    assert isinstance(first, NumericProfile) and isinstance(discrete, NumericProfile)
    assert first.name == "x[0]" and first.count == 9500
    assert first.missing_rate == pytest.approx(0.05)
    assert first.mean == pytest.approx(3.0, abs=0.1) and first.std == pytest.approx(2.0, abs=0.1)
    assert first.edges.size == 9 and np.all(np.diff(first.edges) > 0)
    assert first.proportions.sum() == pytest.approx(1.0)
    assert np.allclose(first.proportions, 0.1, atol=0.01)
    assert first.sample.size == 2000 and np.all(np.diff(first.sample) >= 0)
    # A discrete feature: duplicate quantiles collapse into distinct edges.
    assert discrete.edges.tolist() == [0.0, 1.0, 2.0]
    assert np.allclose(discrete.proportions, [1 / 3, 1 / 3, 1 / 3, 0.0], atol=0.02)
    label = profile.tensors[1]
    assert label.kind is Kind.CATEGORICAL and label.role is Role.OUTPUT
    (classes,) = label.features
    assert isinstance(classes, CategoricalProfile)
    assert sorted(classes.categories) == ["0", "1", "2", "3"] and classes.other == 0.0


def test_profiles_survive_a_json_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (3,)),
                             TensorSpec("text", DataType.BYTES, (1,))))
    text = np.asarray([b"a", b"b", "é".encode()], dtype=object)[rng.integers(0, 3, (500, 1))]
    profile = make_profile(spec, {"x": rng.normal(size=(500, 3)), "text": text,
                                  "label": rng.integers(0, 2, (500, 1))})
    path = profiles.profile_path(tmp_path, "m", "1")
    profiles.save(profile, path)
    loaded = profiles.load(path)
    assert path == tmp_path / "m" / "1" / "reference" / "profile.json"
    assert loaded.model == "m" and loaded.version == "1" and loaded.rows == 500
    for before, after in zip(profile.tensors, loaded.tensors, strict=True):
        assert (before.name, before.role, before.kind) == (after.name, after.role, after.kind)
        for f, g in zip(before.features, after.features, strict=True):
            if isinstance(f, NumericProfile):
                assert isinstance(g, NumericProfile)
                assert np.array_equal(f.sample, g.sample) and np.array_equal(f.edges, g.edges)
                assert (f.mean, f.std, f.min, f.max) == (g.mean, g.std, g.min, g.max)
            else:
                assert f == g
    assert "é" in loaded.tensors[1].features[0].categories  # type: ignore[union-attr]
    assert list(path.parent.iterdir()) == [path]  # no temporary file left behind


def test_categories_past_the_cap_are_other_and_cannot_be_called_unseen(
    rng: np.random.Generator,
) -> None:
    layout = features.layouts(make_spec(inputs=(TensorSpec("c", DataType.BYTES, (1,)),)),
                              drift_config.DriftConfig())[0]
    values = np.asarray([f"c{i}".encode() for i in rng.integers(0, 50, 5000)],
                        dtype=object)[:, None]
    profile = profiles.build("m", "1", [layout], {"c": values},
                             options=profiles.ProfileOptions(max_categories=10))
    (feature,) = profile.tensors[0].features
    assert isinstance(feature, CategoricalProfile)
    assert len(feature.categories) == 10 and 0.6 < feature.other < 0.9


def test_image_features_are_per_channel_means() -> None:
    spec = make_spec(inputs=(TensorSpec("image", DataType.FP32, (3, 4, 4)),),
                     parameters={"drift_sample_rate": "1", "drift_feature_axis_image": "1"})
    layout = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))[0]
    image = np.zeros((2, 3, 4, 4), np.float32)
    image[:, 1] = 2.0
    image[1, 2] = 5.0
    assert layout.matrix(image).tolist() == [[0.0, 2.0, 0.0], [0.0, 2.0, 5.0]]
    assert layout.feature_names(3) == ["image[0]", "image[1]", "image[2]"]


def test_feature_extraction_of_datatypes_and_unbatched_models() -> None:
    spec = make_spec(inputs=(TensorSpec("h", DataType.BF16, (2,)),
                             TensorSpec("flag", DataType.BOOL, (1,))),
                     outputs=(TensorSpec("label", DataType.INT32, (1,)),), max_batch_size=0)
    h, flag, label = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))
    assert (h.kind, flag.kind, label.kind) == (Kind.NUMERIC, Kind.CATEGORICAL, Kind.CATEGORICAL)
    bf16 = (np.array([1.5, -2.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    assert h.matrix(h.as_rows(bf16)).tolist() == [[1.5, -2.0]]
    assert flag.matrix(flag.as_rows(np.array([True]))).tolist() == [["True"]]
    assert label.matrix(label.as_rows(np.array([7], np.int32))).tolist() == [["7"]]
    stacked = features.stack(h, [bf16, bf16])
    assert stacked is not None and stacked.shape == (2, 2)
    assert features.stack(h, [bf16, bf16[:1]]) is None


def test_a_feature_axis_that_does_not_fit_is_an_error() -> None:
    spec = make_spec(parameters={"drift_sample_rate": "1", "drift_feature_axis": "3"})
    layout = features.layouts(spec, drift_config.parse(spec.parameters, spec.name))[0]
    with pytest.raises(ValueError, match="feature axis 3"):
        layout.matrix(np.zeros((2, 64)))


def test_reference_data_files(tmp_path: Path, rng: np.random.Generator) -> None:
    spec = make_spec(inputs=(TensorSpec("x", DataType.FP32, (4,)),))
    x = rng.normal(size=(20, 4)).astype(np.float32)
    np.save(tmp_path / "d.npy", x)
    np.savez(tmp_path / "d.npz", anything=x)
    np.savez(tmp_path / "named.npz", x=x, label=np.arange(20)[:, None])
    with (tmp_path / "d.csv").open("w", newline="") as out:
        writer = csv.writer(out)
        writer.writerow([f"x[{i}]" for i in range(4)] + ["label"])
        writer.writerows([[*row, i % 3] for i, row in enumerate(x.tolist())])
    for name in ("d.npy", "d.npz", "named.npz", "d.csv"):
        data = datafile.load(tmp_path / name, spec)
        assert data["x"].dtype == np.float32 and np.allclose(data["x"], x), name
    assert datafile.load(tmp_path / "named.npz", spec)["label"].dtype == np.int64
    assert datafile.load(tmp_path / "d.csv", spec)["label"].ravel().tolist()[:4] == [0, 1, 2, 0]
    pq = pytest.importorskip("pyarrow.parquet")
    pa = pytest.importorskip("pyarrow")
    pq.write_table(pa.table({f"c{i}": x[:, i] for i in range(4)}), tmp_path / "d.parquet")
    assert np.allclose(datafile.load(tmp_path / "d.parquet", spec)["x"], x)
    holes = {f"c{i}": x[:, i].tolist() for i in range(4)}
    holes["c2"][7] = None
    pq.write_table(pa.table(holes), tmp_path / "holes.parquet")
    with pytest.raises(ValueError, match=r"column 'c2', row 7: missing value"):
        datafile.load(tmp_path / "holes.parquet", spec)
    (tmp_path / "torn.parquet").write_bytes(b"PAR1 not really")
    with pytest.raises(ValueError, match="not a readable parquet file"):
        datafile.load(tmp_path / "torn.parquet", spec)
    with pytest.raises(ValueError, match="unsupported data file"):
        datafile.load(tmp_path / "d.txt", spec)


def test_drift_settings() -> None:
    assert not drift_config.parse({}, "m").enabled
    config = drift_config.parse({"drift_sample_rate": "0.25", "drift_window": "200",
                                 "drift_sampling": "request_id", "drift_feature_axis_img": "1"},
                                "m")
    assert config.enabled and config.window == 200 and config.min_rows == 100
    assert config.axis_of("img") == 1 and config.axis_of("other") == -1
    assert config.store_path(Path("/r"), "m", "2") == Path("/r/.drift/m/2")
    for bad, message in (
        ({"drift_sample_rate": "x"}, "'drift_sample_rate' must be a number"),
        ({"drift_sample_rate": "1.5"}, r"'drift_sample_rate' must be a number in 0.0..1.0"),
        ({"drift_sampling": "sometimes", "drift_sample_rate": "1"},
         r"'drift_sampling' must be one of \['random', 'request_id'\]"),
        ({"drift_feature_axis": "0"}, "batch axis"),
        ({"drift_feature_axis_img": "x"}, "'drift_feature_axis_img' must be an integer axis"),
        ({"drift_psi_alert": "0.05"}, "'drift_psi_alert' must not be below"),
        ({"drift_store_dir": "/var/drift"}, "'drift_store_dir' must be a relative path"),
        ({"drift_store_dir": "../drift"}, "'drift_store_dir' must be a relative path"),
    ):
        with pytest.raises(ModelLoadError, match=message):
            drift_config.parse(bad, "m")


def test_the_drift_store_stays_inside_the_repository(tmp_path: Path) -> None:
    (tmp_path / "out").symlink_to(tmp_path.parent)
    config = drift_config.parse({"drift_store_dir": "out/drift"}, "m")
    with pytest.raises(ModelLoadError, match="drift_store_dir 'out/drift' leads out of the "
                                             "repository"):
        config.store_path(tmp_path, "m", "2")
