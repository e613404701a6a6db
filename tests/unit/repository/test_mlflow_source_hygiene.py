"""What the MLflow source shows and what it accepts from a registry, without a tracking
server (a stand-in client): the tracking URI's credentials never appear in a card or an
error, a version must be a number, an artifact's path plain names, a download capped."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from server.errors import ModelLoadError
from server.repository import mlflow_source
from server.repository.mlflow_source import MlflowSource, _check_artifact_path, _check_size

pytest.importorskip("mlflow")

URI = "https://reader:s3cr3t@mlflow.example.com:5000/?token=t0k3n"
SHOWN = "https://mlflow.example.com:5000/?token=***"


def version(number: str = "3") -> SimpleNamespace:
    return SimpleNamespace(name="digits", version=number, aliases=["champion"], source="s",
                           run_id="", creation_timestamp=0, description="", tags={},
                           status="READY", last_updated_timestamp=0)


class Registry:
    """Answers the alias with ``answer``, or raises it (as MLflow does, quoting the URL)."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer

    def get_model_version_by_alias(self, name: str, alias: str) -> Any:
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def get_model_version_download_uri(self, name: str, number: str) -> str:
        return "s3://bucket/models/digits"


class Artifacts:
    """An artifact store listing ``files`` (path -> listed size); downloads are recorded."""

    def __init__(self, files: dict[str, int]) -> None:
        self.files = files
        self.downloaded: list[str] = []

    def list_artifacts(self, folder: str | None) -> list[SimpleNamespace]:
        return [SimpleNamespace(path=p, is_dir=False, file_size=n)
                for p, n in self.files.items() if folder is None]

    def download_artifacts(self, path: str, into: str) -> str:
        self.downloaded.append(path)
        raise AssertionError("nothing may be downloaded")


def source(tmp_path: Path, answer: Any) -> MlflowSource:
    built = MlflowSource(URI, ["digits@champion"], tmp_path)
    built._client = Registry(answer)  # type: ignore[assignment]
    return built


def test_the_card_shows_the_tracking_uri_without_credentials(tmp_path: Path) -> None:
    card = source(tmp_path, version())._card(version())  # type: ignore[arg-type]
    assert card["mlflow"]["tracking_uri"] == SHOWN


def test_registry_errors_show_no_credentials(tmp_path: Path) -> None:
    failure = Exception("API request to https://reader:s3cr3t@mlflow.example.com:5000/api/2.0/"
                        "mlflow/registered-models/alias?token=t0k3n failed with exception "
                        "refused")
    with pytest.raises(ModelLoadError) as err:
        source(tmp_path, failure).fetch("digits")
    message = str(err.value)
    assert message.startswith(f"MLflow registry {SHOWN}: cannot resolve alias 'champion'")
    assert "s3cr3t" not in message and "t0k3n" not in message and "reader" not in message
    assert "refused" in message


@pytest.mark.parametrize("number", ["../../etc", "3/../4", "", "v3"])
def test_a_version_that_is_not_a_number_is_refused_before_any_path(
    tmp_path: Path, number: str
) -> None:
    with pytest.raises(ModelLoadError, match="not a version number"):
        source(tmp_path / "cache", version(number)).fetch("digits")
    assert not (tmp_path / "cache").exists()


@pytest.mark.parametrize("path", ["../model.onnx", "model/../../x.onnx", "a\\b/model.onnx",
                                  "model/.hidden", "x\ny/model.onnx"])
def test_artifact_paths_must_be_plain_names(path: str) -> None:
    with pytest.raises(ModelLoadError, match="cannot be downloaded: artifact name"):
        _check_artifact_path(path, "v")
    _check_artifact_path("model/model.onnx", "v")


@pytest.mark.parametrize(("files", "message"), [
    ({"model.onnx": 1 << 20, "weights.bin": mlflow_source.MAX_DOWNLOAD_BYTES},
     "download limit"),
    ({"model.onnx": 1, "..": 1}, "cannot be downloaded"),
])
def test_a_version_too_big_or_oddly_named_is_refused_before_downloading(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, int], message: str,
) -> None:
    from mlflow.store.artifact import artifact_repository_registry

    store = Artifacts(files)
    monkeypatch.setattr(artifact_repository_registry, "get_artifact_repository",
                        lambda uri, tracking_uri: store)
    with pytest.raises(ModelLoadError, match=message):
        source(tmp_path, version()).fetch("digits")
    assert store.downloaded == []


def test_a_download_is_capped() -> None:
    _check_size(mlflow_source.MAX_DOWNLOAD_BYTES, "registered model 'd' version 3", "listed")
    with pytest.raises(ModelLoadError, match=r"version 3: its files weigh more than the "
                                             r"download limit of 2048 MiB \(2048 MiB listed\)"):
        _check_size(mlflow_source.MAX_DOWNLOAD_BYTES + 1, "registered model 'd' version 3",
                    "listed")


def test_a_bad_config_in_the_cache_is_named_relative_to_the_model(tmp_path: Path) -> None:
    """A version already cached (no download) whose artifact config.pbtxt does not parse."""
    built = source(tmp_path, version())
    cached = tmp_path / "digits" / "3"
    cached.mkdir(parents=True)
    (cached / "model.onnx").write_bytes(b"onnx")
    (cached / "model_card.json").write_text(
        json.dumps(built._card(version())))  # type: ignore[arg-type]
    (cached / "config.pbtxt").write_text("no_such_field: 1\n")
    with pytest.raises(ModelLoadError) as err:
        built.fetch("digits")
    assert str(err.value).startswith("3/config.pbtxt:"), err.value
    assert str(tmp_path) not in str(err.value)
