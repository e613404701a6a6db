"""The MLflow source without a tracking server: reference parsing, settings, and the cache
layout helpers (none of this needs mlflow installed)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from server.errors import ModelLoadError
from server.repository import model_config as config_io
from server.repository.mlflow_source import (
    MlflowSource,
    ModelRef,
    _holds,
    _mlflow_model_files,
    _pick_onnx,
    _stash_others,
    _write_config,
    parse_refs,
)
from server.settings import ServerSettings, load_settings

# -- references --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("digits@champion", ModelRef("digits", "digits", alias="champion")),
        ("text/3", ModelRef("text", "text", version="3")),
        (" text/03 ", ModelRef("text", "text", version="3")),
        ("live=digits@champion", ModelRef("live", "digits", alias="champion")),
        ("next = digits@challenger", ModelRef("next", "digits", alias="challenger")),
        ("models:/digits@champion", ModelRef("digits", "digits", alias="champion")),
        ("old=models:/digits/2", ModelRef("old", "digits", version="2")),
        ("my model@prod", ModelRef("my model", "my model", alias="prod")),
        ("a@b@c", ModelRef("a@b", "a@b", alias="c")),
    ],
)
def test_parse_ref(text: str, expected: ModelRef) -> None:
    assert ModelRef.parse(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("digits", "NAME@ALIAS or NAME/VERSION"),
        ("digits/0", "positive integer"),
        ("digits/x", "positive integer"),
        ("digits/", "positive integer"),
        ("digits@", "invalid alias"),
        ("@champion", "invalid registered model name"),
        ("/3", "invalid registered model name"),
        ("a/b@c", "invalid registered model name"),
        ("a:b/1", "invalid registered model name"),
        ("digits@a/b", "invalid alias"),
        (".hidden=digits/1", "cannot be a directory name"),
        ("x/y=digits/1", "cannot be a directory name"),
    ],
)
def test_parse_ref_rejects(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ModelRef.parse(text)


@pytest.mark.parametrize("text", ["digits@champion", "text/3", "live=digits@champion"])
def test_ref_round_trips_through_str(text: str) -> None:
    assert str(ModelRef.parse(text)) == text


def test_parse_refs_groups_by_served_name() -> None:
    refs = parse_refs(["digits@champion", "digits@challenger", "digits@champion", "text/3"])
    assert list(refs) == ["digits", "text"]
    assert [r.alias for r in refs["digits"]] == ["champion", "challenger"]


def test_parse_refs_errors_name_the_reference() -> None:
    with pytest.raises(ModelLoadError, match="invalid MLflow model reference 'digits'"):
        parse_refs(["digits"])
    with pytest.raises(ModelLoadError, match="names two registered models"):
        parse_refs(["m=a@x", "m=b@y"])
    with pytest.raises(ModelLoadError, match="at least one"):
        parse_refs([])


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source", "uri"),
    [
        ("mlflow://127.0.0.1:5000", "http://127.0.0.1:5000"),
        ("mlflow://registry:5000/", "http://registry:5000"),
        ("mlflow+http://registry/mlflow", "http://registry/mlflow"),
        ("mlflow+https://registry.example", "https://registry.example"),
    ],
)
def test_mlflow_tracking_uri_is_derived(source: str, uri: str) -> None:
    settings = ServerSettings(model_source=source, mlflow_models=("digits@champion",))
    assert settings.mlflow_tracking_uri == uri


def test_filesystem_is_the_default_source(tmp_path: Path) -> None:
    settings = ServerSettings(model_repository=tmp_path)
    assert settings.mlflow_tracking_uri is None
    assert settings.models_root == tmp_path
    assert settings.resolved_state_file == tmp_path / ".peregrine-state.json"


def test_mlflow_state_file_lives_in_the_cache(tmp_path: Path) -> None:
    settings = ServerSettings(model_source="mlflow://h:1", mlflow_models=("m/1",),
                              model_cache_dir=tmp_path)
    assert settings.models_root == tmp_path
    assert settings.resolved_state_file == tmp_path / ".peregrine-state.json"


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"model_source": "s3://bucket"}, "model_source must be empty"),
        ({"model_source": "mlflow://"}, "model_source must be empty"),
        ({"model_source": "mlflow://h:1"}, "needs mlflow_models"),
        ({"mlflow_models": ("m/1",)}, "needs an MLflow model_source"),
    ],
)
def test_mlflow_settings_are_validated(changes: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ServerSettings(**changes)  # type: ignore[arg-type]


def test_mlflow_flags_from_the_environment(tmp_path: Path) -> None:
    settings = load_settings({}, environ={
        "PEREGRINE_MODEL_SOURCE": "mlflow://127.0.0.1:5000",
        "PEREGRINE_MLFLOW_MODELS": "digits@champion, text/3",
        "PEREGRINE_MODEL_CACHE_DIR": str(tmp_path),
    })
    assert settings.mlflow_models == ("digits@champion", "text/3")
    assert settings.model_cache_dir == tmp_path


# -- cache layout ------------------------------------------------------------------------------


def test_pick_onnx_prefers_the_shallowest_model_onnx() -> None:
    files = ["MLmodel", "sub/model.onnx", "model.onnx", "other.onnx"]
    assert _pick_onnx(files, "v", "uri") == "model.onnx"
    assert _pick_onnx(["onnx/digits.onnx", "config.pbtxt"], "v", "uri") == "onnx/digits.onnx"


def test_pick_onnx_errors() -> None:
    assert _pick_onnx(["README.txt"], "v", "uri") is None
    with pytest.raises(ModelLoadError, match=r"several \.onnx artifacts"):
        _pick_onnx(["a.onnx", "b.onnx"], "v", "uri")


def test_an_mlflow_model_is_taken_whole_from_its_shallowest_mlmodel() -> None:
    files = ["model/MLmodel", "model/model.skops", "model/code/helpers.py",
             "model/model_card.json", "deeper/x/MLmodel", "README.txt"]
    assert _mlflow_model_files(files) == {
        "model/MLmodel": "MLmodel", "model/model.skops": "model.skops",
        "model/code/helpers.py": "code/helpers.py"}
    assert _mlflow_model_files(["MLmodel", "model.pkl"]) == {"MLmodel": "MLmodel",
                                                            "model.pkl": "model.pkl"}
    assert _mlflow_model_files(["README.txt"]) is None


def test_config_is_left_out_for_one_version_without_one(tmp_path: Path) -> None:
    (tmp_path / "4").mkdir()
    (tmp_path / "config.pbtxt").write_text('name: "stale"\n')
    _write_config(tmp_path, "digits", ["4"])
    assert not (tmp_path / "config.pbtxt").exists()


def test_config_serves_every_version_under_the_served_name(tmp_path: Path) -> None:
    for version in ("3", "4"):
        (tmp_path / version).mkdir()
    (tmp_path / "4" / "config.pbtxt").write_text(
        'name: "trained"\nmax_batch_size: 8\nversion_policy { specific { versions: [4] } }\n'
    )
    _write_config(tmp_path, "digits", ["3", "4"])
    config = config_io.read_config(tmp_path)
    assert config.name == "digits"
    assert config.max_batch_size == 8
    assert config.version_policy.WhichOneof("policy_choice") == "all"
    mtime = (tmp_path / "config.pbtxt").stat().st_mtime_ns
    _write_config(tmp_path, "digits", ["3", "4"])
    assert (tmp_path / "config.pbtxt").stat().st_mtime_ns == mtime  # unchanged, not rewritten


def card(version: str, tracking_uri: str = "http://r") -> dict[str, object]:
    return {"mlflow": {"tracking_uri": tracking_uri,
                       "registry": {"name": "m", "version": version, "source": "s", "run_id": ""}}}


def cached_version(model_dir: Path, version: str) -> Path:
    path = model_dir / version
    path.mkdir(parents=True)
    (path / "model.onnx").write_bytes(b"onnx")
    (path / "model_card.json").write_text(json.dumps(card(version)))
    return path


def test_a_cached_version_is_reused_only_for_the_same_registry_version(tmp_path: Path) -> None:
    path = cached_version(tmp_path, "3")
    assert _holds(path, card("3"))
    assert not _holds(path, card("3", tracking_uri="http://other"))
    (path / "model.onnx").unlink()
    assert not _holds(path, card("3"))


def test_versions_no_ref_resolves_to_are_stashed_and_pruned(tmp_path: Path) -> None:
    for version in ("1", "2", "3", "4", "5"):
        cached_version(tmp_path, version)
    _stash_others(tmp_path, {"5"})
    assert sorted(p.name for p in tmp_path.iterdir()) == [".stash", "5"]
    assert len(list((tmp_path / ".stash").iterdir())) == 3


def test_without_mlflow_installed_the_error_says_what_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow -> ImportError
    with pytest.raises(ModelLoadError, match=r"pip install 'peregrine\[mlflow\]'"):
        MlflowSource("http://127.0.0.1:1", ["digits@champion"], tmp_path)
