"""The --retrain-* options are checked at start, each mistake named."""

from __future__ import annotations

import pytest

from server.drift.retrain_options import RetrainSettings


@pytest.mark.parametrize(("settings", "named"), [
    (RetrainSettings(command="true", url="http://127.0.0.1:9/hook"), "exclude each other"),
    (RetrainSettings(command="'unclosed"), "retrain_command"),
    (RetrainSettings(command="   "), "retrain_command"),
    (RetrainSettings(url="file:///etc/passwd"), "retrain_url"),
    (RetrainSettings(url="http:///no-host"), "retrain_url"),
    (RetrainSettings(command="true", cooldown_s=0), "retrain_cooldown_secs"),
    (RetrainSettings(command="true", timeout_s=-1), "retrain_timeout_secs"),
    (RetrainSettings(command="true", every_rows=-5), "must not be negative"),
    (RetrainSettings(every_s=60), "need retrain_command or retrain_url"),
])
def test_a_mistake_is_refused_naming_the_option(settings: RetrainSettings, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        settings.check()


@pytest.mark.parametrize(("settings", "enabled"), [
    (RetrainSettings(), False),
    (RetrainSettings(command="python retrain.py --fast", every_rows=1000), True),
    (RetrainSettings(url="https://127.0.0.1:8443/retrain", every_s=3600), True),
])
def test_a_sound_setting_passes_and_is_on_when_it_names_a_hook(
        settings: RetrainSettings, enabled: bool) -> None:
    settings.check()  # raises on a mistake
    assert settings.enabled is enabled
