"""Config ``parameters`` through a real server: a model with an unknown key or a bad drift
value does not load, and the repository index says which key and what exists; the others
load, and a config the server served (with its ``runtime`` and ``card.*`` parameters) loads
back as an override."""

from __future__ import annotations

import json
from pathlib import Path

import tritonclient.grpc as grpcclient

from tests import model_factory
from tests.server_harness import ServerThread


def with_parameters(repo: Path, name: str, parameters: dict[str, str]) -> None:
    model_dir = model_factory.add_sub_model(repo, name)
    config = (model_dir / "config.pbtxt").read_text()
    for key, value in parameters.items():
        config += f'parameters {{ key: "{key}" value: {{ string_value: "{value}" }} }}\n'
    model_factory.write_config(model_dir, config)


def test_bad_parameters_fail_the_load_and_name_the_key(tmp_path: Path) -> None:
    with_parameters(tmp_path, "typo", {"drift_sample_rate": "0.5", "drift_windw": "100"})
    with_parameters(tmp_path, "bad_drift", {"drift_sample_rate": "2"})
    with_parameters(tmp_path, "good", {"drift_sample_rate": "0", "drift_window": "100",
                                       "queue_delay": "fixed"})
    with ServerThread(tmp_path, strict_readiness=False, model_control_mode="explicit",
                      load_model=("typo", "bad_drift", "good")) as server, \
            grpcclient.InferenceServerClient(server.url) as client:
        index = {m.name: (m.state, m.reason) for m in client.get_model_repository_index().models
                 if not m.version}
        state, reason = index["typo"]
        assert state == "UNAVAILABLE"
        assert "parameter 'drift_windw' is not a key" in reason, reason
        assert "did you mean 'drift_window'?" in reason and "drift_sample_rate" in reason
        state, reason = index["bad_drift"]
        assert state == "UNAVAILABLE"
        assert "parameter 'drift_sample_rate' must be a number in 0.0..1.0, got '2'" in reason
        assert client.is_model_ready("good")

        served = client.get_model_config("good", as_json=True)["config"]
        assert served["parameters"]["runtime"]["string_value"].startswith("onnxruntime")
        served["parameters"]["card.owner"] = {"string_value": "team"}
        client.load_model("good", config=json.dumps(served))
        assert client.is_model_ready("good")
