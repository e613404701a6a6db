"""The lifecycle's small parts: the durable state file, model cards and the filesystem
source's fingerprints (what poll mode compares to notice a change)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest

from server import atomic_file
from server.errors import ModelLoadError, ModelNotFound
from server.repository.cards import CARD_FILE, read_card
from server.repository.source import FilesystemSource
from server.repository.state_file import RepositoryState, StateFile
from tests import model_factory

# -- state file ------------------------------------------------------------------------------


def test_state_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "nested" / "state.json"  # the directory is made on first save
    state = RepositoryState(explicit_models={"b", "a"}, last_good={"m": [3, 1], "n": [7]})
    StateFile(path).save(state)
    loaded = StateFile(path).load()
    assert loaded.explicit_models == {"a", "b"}
    assert loaded.last_good == {"m": [1, 3], "n": [7]}
    document = json.loads(path.read_text())
    assert document == {"explicit_models": ["a", "b"], "last_good": {"m": [1, 3], "n": [7]}}
    assert [p.name for p in path.parent.iterdir()] == ["state.json"]


def test_state_save_replaces_the_previous_file(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    file = StateFile(path)
    file.save(RepositoryState(explicit_models={"a"}))
    file.save(RepositoryState(explicit_models={"b"}, last_good={"b": [2]}))
    assert file.load() == RepositoryState(explicit_models={"b"}, last_good={"b": [2]})
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_missing_or_unset_state_is_empty(tmp_path: Path) -> None:
    assert StateFile(tmp_path / "absent.json").load() == RepositoryState()
    unset = StateFile(None)
    unset.save(RepositoryState(explicit_models={"a"}))  # nowhere to write: a no-op
    assert unset.load() == RepositoryState()


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_failed_save_keeps_the_old_file_whole_and_leaves_no_partial_file(
    failing: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "state.json"
    file = StateFile(path)
    old = RepositoryState(explicit_models={"old"}, last_good={"old": [1]})
    file.save(old)
    before = path.read_bytes()

    class FailingOs:
        """``os`` as the atomic writer sees it, one call failing (the real module untouched)."""

        def __getattr__(self, name: str) -> object:
            if name == failing:
                return self.fail
            return getattr(os, name)

        @staticmethod
        def fail(*args: object) -> None:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(atomic_file, "os", FailingOs())
    with caplog.at_level(logging.WARNING, logger="server.repository.state_file"):
        file.save(RepositoryState(explicit_models={"new"}, last_good={"new": [9] * 1000}))
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert file.load() == old
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
    assert any("cannot write state file" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("content", [
    b"{not json",
    b"",
    b"[]",
    b'{"explicit_models": 5}',
    b'{"last_good": {"m": ["one"]}}',
    b'{"last_good": ["m"]}',
    b"\xff\xfe not utf-8",
])
def test_unreadable_state_is_ignored_with_a_warning(
    content: bytes, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "state.json"
    path.write_bytes(content)
    with caplog.at_level(logging.WARNING, logger="server.repository.state_file"):
        assert StateFile(path).load() == RepositoryState()
    assert any("ignoring unreadable state file" in r.getMessage() for r in caplog.records)


# -- model cards -----------------------------------------------------------------------------


def _card_dir(tmp_path: Path, content: bytes | None) -> Path:
    version_dir = tmp_path / "1"
    version_dir.mkdir(parents=True)
    if content is not None:
        (version_dir / CARD_FILE).write_bytes(content)
    return version_dir


def test_no_card_is_fine(tmp_path: Path) -> None:
    assert read_card(_card_dir(tmp_path, None)) == {}


def test_card_is_flattened_into_dotted_string_properties(tmp_path: Path) -> None:
    card = {
        "training_data": {"name": "digits", "version": "2024-05-01", "rows": 1797},
        "hyperparameters": {"lr": 0.001, "layers": [64, 32], "dropout": None,
                            "optimizer": {"name": "adam", "betas": [0.9, 0.999]}},
        "metrics": {"accuracy": 0.975, "calibrated": True, "overfit": False},
        "code_revision": "abc1234",
        "notes": "ünïcode ✓",
    }
    flat = read_card(_card_dir(tmp_path, json.dumps(card).encode()))
    assert flat == {
        "card.training_data.name": "digits",
        "card.training_data.version": "2024-05-01",
        "card.training_data.rows": "1797",
        "card.hyperparameters.lr": "0.001",
        "card.hyperparameters.layers": "[64, 32]",
        "card.hyperparameters.dropout": "",
        "card.hyperparameters.optimizer.name": "adam",
        "card.hyperparameters.optimizer.betas": "[0.9, 0.999]",
        "card.metrics.accuracy": "0.975",
        "card.metrics.calibrated": "true",
        "card.metrics.overfit": "false",
        "card.code_revision": "abc1234",
        "card.notes": "ünïcode ✓",
    }
    assert read_card(_card_dir(tmp_path / "empty", b"{}")) == {}


@pytest.mark.parametrize(("content", "says"), [
    (b"{ not json", "is malformed"),
    (b'{"a": 1,}', "is malformed"),
    (b"\xff\xfe not utf-8", "is malformed"),
    (b"", "is malformed"),
    (b"[1, 2]", "must hold a JSON object"),
    (b'"text"', "must hold a JSON object"),
    (b'{"metrics": {"": 1}}', "keys must be non-empty strings"),
])
def test_malformed_card_is_a_load_error_naming_the_file(
    content: bytes, says: str, tmp_path: Path
) -> None:
    version_dir = _card_dir(tmp_path, content)
    with pytest.raises(ModelLoadError) as err:
        read_card(version_dir)
    assert str(version_dir / CARD_FILE) in str(err.value)
    assert says in str(err.value)


# -- filesystem source -----------------------------------------------------------------------


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    repo = tmp_path / "repo"
    model_factory.scaled_model_version(repo, "m", 1, 1.0, with_config=True)
    return repo


def test_fingerprint_is_stable_while_nothing_changes(repo: Path) -> None:
    source = FilesystemSource(repo)
    assert source.fingerprint("m") == source.fingerprint("m")
    assert source.fingerprint("m") != source.fingerprint("absent")


def test_fingerprint_changes_on_a_new_version(repo: Path) -> None:
    source = FilesystemSource(repo)
    before = source.fingerprint("m")
    model_factory.scaled_model_version(repo, "m", 2, 2.0)
    assert source.fingerprint("m") != before


def test_fingerprint_changes_on_a_removed_version(repo: Path) -> None:
    model_factory.scaled_model_version(repo, "m", 2, 2.0)
    source = FilesystemSource(repo)
    before = source.fingerprint("m")
    for child in (repo / "m" / "2").iterdir():
        child.unlink()
    (repo / "m" / "2").rmdir()
    assert source.fingerprint("m") != before


def test_fingerprint_changes_on_a_config_edit(repo: Path) -> None:
    source = FilesystemSource(repo)
    before = source.fingerprint("m")
    model_factory.write_config(
        repo / "m", model_factory.scaled_model_config("m", max_queue_delay_microseconds=100)
    )
    assert source.fingerprint("m") != before


def test_fingerprint_changes_when_a_model_file_changes(repo: Path) -> None:
    source = FilesystemSource(repo)
    model_file = repo / "m" / "1" / "model.onnx"
    before = source.fingerprint("m")
    # Same size, rewritten in place: only the modification time tells.
    stat = model_file.stat()
    model_file.write_bytes(model_file.read_bytes()[::-1])
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert model_file.stat().st_size == stat.st_size
    after_edit = source.fingerprint("m")
    assert after_edit != before
    # Another size, same modification time.
    model_file.write_bytes(model_file.read_bytes() + b"\0")
    os.utime(model_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert source.fingerprint("m") != after_edit


def test_fingerprint_changes_when_a_card_or_file_appears(repo: Path) -> None:
    source = FilesystemSource(repo)
    before = source.fingerprint("m")
    (repo / "m" / "1" / CARD_FILE).write_text('{"code_revision": "abc"}')
    with_card = source.fingerprint("m")
    assert with_card != before
    (repo / "m" / "2").mkdir()  # a half-copied version: the directory alone counts
    assert source.fingerprint("m") != with_card


def test_fingerprint_ignores_dot_prefixed_temporary_directories(repo: Path) -> None:
    source = FilesystemSource(repo)
    before = source.fingerprint("m")
    staging = repo / "m" / ".tmp-v2-abc"
    staging.mkdir()
    (staging / "model.onnx").write_bytes(b"half written")
    (repo / "m" / "not-a-version").mkdir()
    assert source.fingerprint("m") == before
    staging.rename(repo / "m" / "2")  # publishing it is what counts
    assert source.fingerprint("m") != before


def test_list_skips_dot_prefixed_entries_and_files(repo: Path) -> None:
    model_factory.scaled_model_version(repo, "a", 1, 1.0, with_config=True)
    (repo / ".staging-model").mkdir()
    (repo / ".peregrine-state.json").write_text("{}")
    (repo / "README").write_text("notes")
    source = FilesystemSource(repo)
    assert source.list() == ["a", "m"]
    assert source.fetch("m") == repo / "m"
    with pytest.raises(ModelNotFound):
        source.fetch("absent")
    with pytest.raises(ModelLoadError):
        FilesystemSource(repo / "absent").list()
