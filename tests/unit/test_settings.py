"""server.settings.load_settings: precedence defaults < TOML < env < flags, and validation."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest

from server.settings import OPTIONS, ServerSettings, load_settings, parse_bool


def write_toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "peregrine.toml"
    path.write_text(text, encoding="utf-8")
    return path


def no_flags() -> dict[str, Any]:
    return {option.name: None for option in OPTIONS}


# -- defaults ----------------------------------------------------------------------------------


def test_defaults_without_any_source() -> None:
    settings = load_settings(no_flags(), environ={})
    assert settings.host == "127.0.0.1"
    assert settings.grpc_port == 8001
    assert settings.metrics_port == 8002
    assert settings.allow_metrics is True
    assert settings.log_level == "info"
    assert settings.log_format == "text"
    assert settings.grpc_max_message_bytes == 64 * 1024 * 1024
    assert settings.model_load_thread_count == 4
    assert settings.exit_timeout_secs == 30.0
    assert settings.strict_readiness is True


def test_every_option_is_a_settings_field() -> None:
    fields = {f.name for f in dataclasses.fields(ServerSettings)}
    names = [option.name for option in OPTIONS]
    assert len(names) == len(set(names))
    assert set(names) == fields


def test_option_flag_and_env_are_derived_from_the_name() -> None:
    by_name = {option.name: option for option in OPTIONS}
    assert by_name["grpc_port"].flag == "--grpc-port"
    assert by_name["grpc_port"].env == "PEREGRINE_GRPC_PORT"
    assert by_name["model_repository"].env == "PEREGRINE_MODEL_REPOSITORY"


def test_settings_are_frozen() -> None:
    settings = load_settings({}, environ={})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.grpc_port = 1  # type: ignore[misc]


# -- precedence ----------------------------------------------------------------------------------


def test_toml_overrides_defaults(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'grpc_port = 9101\nlog_format = "json"\nallow_metrics = false\n'
                                "exit_timeout_secs = 3\n")
    settings = load_settings({}, environ={}, config_file=path)
    assert settings.grpc_port == 9101
    assert settings.log_format == "json"
    assert settings.allow_metrics is False
    assert settings.exit_timeout_secs == 3.0
    assert isinstance(settings.exit_timeout_secs, float)
    assert settings.metrics_port == 8002  # untouched


def test_env_overrides_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "grpc_port = 9101\nmetrics_port = 9102\n")
    settings = load_settings({}, environ={"PEREGRINE_GRPC_PORT": "9201"}, config_file=path)
    assert settings.grpc_port == 9201
    assert settings.metrics_port == 9102


def test_flags_override_env_and_toml(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'grpc_port = 9101\nlog_level = "error"\nhost = "0.0.0.0"\n')
    environ = {"PEREGRINE_GRPC_PORT": "9201", "PEREGRINE_LOG_LEVEL": "warning"}
    flags = no_flags() | {"grpc_port": "9301"}
    settings = load_settings(flags, environ=environ, config_file=path)
    assert settings.grpc_port == 9301
    assert settings.log_level == "warning"  # env beats the file
    assert settings.host == "0.0.0.0"  # the file beats the default


def test_unset_flags_do_not_override(tmp_path: Path) -> None:
    settings = load_settings(no_flags(), environ={"PEREGRINE_METRICS_PORT": "9999"})
    assert settings.metrics_port == 9999


def test_config_file_from_environment(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "model_load_thread_count = 7\n")
    settings = load_settings({}, environ={"PEREGRINE_CONFIG_FILE": str(path)})
    assert settings.model_load_thread_count == 7


def test_explicit_config_file_beats_the_environment_variable(tmp_path: Path) -> None:
    explicit = write_toml(tmp_path, "model_load_thread_count = 7\n")
    other = tmp_path / "other.toml"
    other.write_text("model_load_thread_count = 2\n", encoding="utf-8")
    settings = load_settings({}, environ={"PEREGRINE_CONFIG_FILE": str(other)},
                             config_file=explicit)
    assert settings.model_load_thread_count == 7


def test_server_table_is_supported(tmp_path: Path) -> None:
    path = write_toml(tmp_path, '[server]\ngrpc_port = 9401\nmodel_repository = "/srv/models"\n')
    settings = load_settings({}, environ={}, config_file=path)
    assert settings.grpc_port == 9401
    assert settings.model_repository == Path("/srv/models")
    assert isinstance(settings.model_repository, Path)


def test_toml_keys_may_use_dashes(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "grpc-port = 9501\n")
    assert load_settings({}, environ={}, config_file=path).grpc_port == 9501


def test_string_values_are_converted_by_the_option_kind(tmp_path: Path) -> None:
    environ = {
        "PEREGRINE_ALLOW_METRICS": "off",
        "PEREGRINE_STRICT_READINESS": "no",
        "PEREGRINE_UVLOOP": "0",
        "PEREGRINE_REFLECTION": "YES",
        "PEREGRINE_EXIT_TIMEOUT_SECS": "2.5",
        "PEREGRINE_MODEL_REPOSITORY": str(tmp_path),
        "PEREGRINE_GRPC_MAX_MESSAGE_BYTES": "1024",
    }
    settings = load_settings({}, environ=environ)
    assert settings.allow_metrics is False
    assert settings.strict_readiness is False
    assert settings.uvloop is False
    assert settings.reflection is True
    assert settings.exit_timeout_secs == 2.5
    assert settings.model_repository == tmp_path
    assert settings.grpc_max_message_bytes == 1024


def test_unrelated_environment_variables_are_ignored() -> None:
    settings = load_settings({}, environ={"PEREGRINE_NOT_AN_OPTION": "x", "GRPC_PORT": "1"})
    assert settings.grpc_port == 8001


# -- validation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("port", ["70000", "-1", "65536"])
def test_port_out_of_range(port: str) -> None:
    with pytest.raises(ValueError, match=r"grpc_port must be within 0..65535"):
        load_settings({"grpc_port": port}, environ={})


def test_port_that_is_not_a_number_names_the_flag() -> None:
    with pytest.raises(ValueError, match="--metrics-port"):
        load_settings({"metrics_port": "eighty"}, environ={})


def test_port_zero_is_allowed() -> None:
    assert load_settings({"grpc_port": "0"}, environ={}).grpc_port == 0


def test_bad_bool_in_env_names_the_variable() -> None:
    with pytest.raises(ValueError, match=r"PEREGRINE_ALLOW_METRICS.*expected true or false"):
        load_settings({}, environ={"PEREGRINE_ALLOW_METRICS": "maybe"})


def test_bad_bool_in_toml_names_the_file_and_key(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'strict_readiness = "sometimes"\n')
    with pytest.raises(ValueError, match=r"peregrine\.toml.*strict_readiness"):
        load_settings({}, environ={}, config_file=path)


def test_unknown_toml_key_is_an_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "grpc_prot = 9000\n")
    with pytest.raises(ValueError, match="unknown option 'grpc_prot'"):
        load_settings({}, environ={}, config_file=path)


def test_unknown_key_in_server_table_is_an_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "[server]\nverbose = true\n")
    with pytest.raises(ValueError, match="unknown option 'verbose'"):
        load_settings({}, environ={}, config_file=path)


def test_bad_choice_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="must be one of debug, info, warning, error"):
        load_settings({"log_level": "verbose"}, environ={})
    with pytest.raises(ValueError, match=r"PEREGRINE_LOG_FORMAT.*text, json"):
        load_settings({}, environ={"PEREGRINE_LOG_FORMAT": "xml"})
    path = write_toml(tmp_path, 'log_format = "yaml"\n')
    with pytest.raises(ValueError, match="log_format"):
        load_settings({}, environ={}, config_file=path)


def test_malformed_toml_is_an_error(tmp_path: Path) -> None:
    path = write_toml(tmp_path, "grpc_port = = 1\n")
    with pytest.raises(ValueError, match="config file"):
        load_settings({}, environ={}, config_file=path)


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="config file"):
        load_settings({}, environ={}, config_file=tmp_path / "absent.toml")


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("grpc_port = true\n", "grpc_port"),
        ("grpc_port = 80.5\n", "grpc_port"),
        ('allow_metrics = 1\n', "allow_metrics"),
        ("model_repository = 5\n", "model_repository"),
        ("host = 127\n", "host"),
        ("exit_timeout_secs = false\n", "exit_timeout_secs"),
    ],
)
def test_toml_values_of_the_wrong_type_are_rejected(tmp_path: Path, text: str, key: str) -> None:
    path = write_toml(tmp_path, text)
    with pytest.raises(ValueError, match=key):
        load_settings({}, environ={}, config_file=path)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("grpc_max_message_bytes", "0", "grpc_max_message_bytes must be positive"),
        ("model_load_thread_count", "0", "model_load_thread_count must be positive"),
        ("exit_timeout_secs", "-1", "exit_timeout_secs must not be negative"),
    ],
)
def test_range_checks(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        load_settings({name: value}, environ={})


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1", True), ("true", True), (" Yes ", True), ("ON", True),
     ("0", False), ("false", False), ("No", False), ("off", False)],
)
def test_parse_bool(text: str, expected: bool) -> None:
    assert parse_bool(text) is expected


@pytest.mark.parametrize("text", ["", "2", "y", "truthy"])
def test_parse_bool_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_bool(text)


def test_toml_list_value_for_a_list_option(tmp_path: Path) -> None:
    path = write_toml(tmp_path, 'model_control_mode = "explicit"\nload_model = ["a", "b"]\n')
    settings = load_settings({}, environ={}, config_file=path)
    assert settings.load_model == ("a", "b")
    bad = write_toml(tmp_path, 'model_control_mode = "explicit"\nload_model = [1, 2]\n')
    with pytest.raises(ValueError, match="load_model"):
        load_settings({}, environ={}, config_file=bad)


# -- bounds ------------------------------------------------------------------------------------


def test_bounds_have_defaults_and_the_caps_derive_from_the_message_limit() -> None:
    settings = load_settings(no_flags(), environ={})
    assert (settings.max_inflight_requests, settings.max_inflight_per_stream,
            settings.max_streams) == (4096, 128, 1024)
    mib = 1024 * 1024
    assert settings.tensor_elements_cap == settings.request_bytes_cap == 64 * mib
    assert settings.bytes_elements_cap == mib
    assert settings.queued_bytes_bound == 1024 * mib
    larger = load_settings({"grpc_max_message_bytes": str(128 * mib)}, environ={})
    assert larger.tensor_elements_cap == larger.request_bytes_cap == 128 * mib
    assert larger.bytes_elements_cap == 2 * mib and larger.queued_bytes_bound == 2048 * mib
    given = load_settings({"max_request_bytes": "1000", "max_bytes_elements": "5",
                           "max_tensor_elements": "7"}, environ={})
    assert (given.tensor_elements_cap, given.request_bytes_cap, given.bytes_elements_cap,
            given.queued_bytes_bound) == (7, 1000, 5, 16_000)


@pytest.mark.parametrize("name", ["max_inflight_requests", "max_inflight_per_stream",
                                  "max_streams", "max_queued_bytes", "max_tensor_elements",
                                  "max_request_bytes", "max_bytes_elements"])
def test_bounds_must_be_positive(name: str) -> None:
    with pytest.raises(ValueError, match=f"{name} must be positive"):
        ServerSettings(**{name: 0})


def test_queued_bytes_must_hold_one_request_of_the_largest_size() -> None:
    with pytest.raises(ValueError, match=r"max_queued_bytes \(1000\) must be at least "
                                         r"max_request_bytes \(2000\)"):
        ServerSettings(max_queued_bytes=1000, max_request_bytes=2000)


# -- response cache ----------------------------------------------------------------------------


def test_the_response_cache_is_off_unless_cache_config_is_given() -> None:
    assert load_settings(no_flags(), environ={}).response_cache_bytes == 0
    settings = load_settings({"cache_config": "local,size=1048576"}, environ={})
    assert settings.response_cache_bytes == 1048576
    from_env = load_settings({}, environ={"PEREGRINE_CACHE_CONFIG": "local, size = 4096"})
    assert from_env.response_cache_bytes == 4096


@pytest.mark.parametrize(("value", "message"), [
    ("redis,host=localhost", "only the local cache"),
    ("local", "needs size"),
    ("local,size=big", "number of bytes"),
    ("local,size=0", "must be positive"),
    ("local,size=10,eviction=lru", "takes size=<bytes> only"),
])
def test_a_bad_cache_config_names_the_flag(value: str, message: str) -> None:
    with pytest.raises(ValueError, match=f"--cache-config: .*{message}"):
        load_settings({"cache_config": value}, environ={})
