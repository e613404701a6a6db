"""The name rule, the path rule and how reasons hide the server's paths
(server/security/names.py, server/security/paths.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.errors import InvalidInput, ModelLoadError
from server.security.names import MAX_NAME_BYTES, check_model_name
from server.security.paths import check_relative, confined, hide_paths, relative_path


@pytest.mark.parametrize("name", ["resnet50", "my-model_v2.onnx", "modèle", "a b", "x" * 255])
def test_model_names_that_are_one_plain_component_pass(name: str) -> None:
    assert check_model_name(name) == name


@pytest.mark.parametrize(("name", "why"), [
    ("", "is empty"),
    ("x" * (MAX_NAME_BYTES + 1), "256 bytes long (UTF-8); the limit is 255"),
    ("é" * 128, "256 bytes long (UTF-8); the limit is 255"),
    ("/tmp/x", "path separator"),
    ("../x", "path separator"),
    ("m/1/../../m", "path separator"),
    ("a\\b", "path separator"),
    ("..", "'..'"),
    ("a..b", "'..'"),
    (".", "starts with '.'"),
    (".drift", "starts with '.'"),
    ("x\x00y", "non-printable"),
    ("x\ny", "non-printable"),
    ("x\x1b[31m", "non-printable"),
    ("x\u202ey", "non-printable"),  # right-to-left override
])
def test_path_like_or_unprintable_names_are_refused(name: str, why: str) -> None:
    with pytest.raises(InvalidInput, match=r"^model name ") as err:
        check_model_name(name)
    assert why in err.value.message
    if len(name) > 2:
        assert name not in err.value.message  # never echoed


@pytest.mark.parametrize("value", ["model.onnx", "sub/model.onnx", "engines", "a..b/c"])
def test_relative_paths_pass(value: str) -> None:
    assert relative_path(value) == value


@pytest.mark.parametrize("value", ["", "/etc/passwd", "../x", "a/../../x", "a/..", "~/x",
                                   "\\x", "..\\x", "x\x00"])
def test_absolute_climbing_or_unprintable_paths_are_refused(value: str) -> None:
    with pytest.raises(ValueError, match="a relative path"):
        relative_path(value)
    with pytest.raises(ModelLoadError, match=r"^default_model_filename .* must be a relative"):
        check_relative(value, "default_model_filename")


def test_confined_resolves_symlinks_and_refuses_those_that_lead_out(tmp_path: Path) -> None:
    model = tmp_path / "m"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.onnx").write_bytes(b"x")
    (tmp_path / "secret").write_bytes(b"s")
    (model / "1" / "inside.onnx").symlink_to(model / "1" / "model.onnx")
    (model / "1" / "outside.onnx").symlink_to(tmp_path / "secret")
    (model / "1" / "loop").symlink_to(model / "1" / "loop")
    assert confined(model / "1", "inside.onnx", "f") == (model / "1" / "model.onnx").resolve()
    assert confined(model, "not/there/yet", "f") == model.resolve() / "not" / "there" / "yet"
    with pytest.raises(ModelLoadError, match=r"^f 'outside\.onnx' leads out of the version dir"):
        confined(model / "1", "outside.onnx", "f", "the version directory")
    with pytest.raises(ModelLoadError, match=r"^f '/etc/passwd' must be a relative path"):
        confined(model, "/etc/passwd", "f")
    with pytest.raises(ModelLoadError, match=r"cannot be resolved|leads out"):
        confined(model / "1", "loop", "f")


def test_reasons_show_paths_relative_to_the_model_directory(tmp_path: Path) -> None:
    model = tmp_path / "m"
    model.mkdir()
    link = tmp_path / "link"
    link.symlink_to(model)
    text = (f"could not load '{model}/1/model.onnx': Load model from {link}/1/model.onnx "
            f"failed; see {model}. Not {model}2/1/model.onnx nor {model}.bak")
    assert hide_paths(text, [link]) == (
        "could not load '1/model.onnx': Load model from 1/model.onnx failed; see .. "
        f"Not {model}2/1/model.onnx nor {model}.bak")
