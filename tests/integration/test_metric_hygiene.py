"""/metrics stays bounded through a real server: the series of unloaded versions and of
variants and shadows no longer in a routing table go, over 100 load/unload cycles and 1,000
route changes."""

from __future__ import annotations

import re
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from tests import model_factory
from tests.server_harness import ServerThread

KEPT, CYCLED = "kept", "cycled"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo: Path = tmp_path_factory.mktemp("hygiene")
    for name in (KEPT, CYCLED):
        model_factory.identity_model(repo, name, "FP32", max_queue_delay_microseconds=0)
    with ServerThread(repo, model_control_mode="explicit", load_model=(KEPT,)) as running:
        yield running


def series(server: ServerThread) -> Counter[str]:
    """Samples on /metrics per family (the label sets the server exports)."""
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return Counter({family.name: len(family.samples)
                    for family in text_string_to_metric_families(text)})


def labelled(server: ServerThread, label: str, pattern: str) -> list[str]:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    return [f"{s.name}{s.labels}" for family in text_string_to_metric_families(text)
            for s in family.samples if re.fullmatch(pattern, s.labels.get(label, ""))]


def infer(client: grpcclient.InferenceServerClient, model: str) -> None:
    x = np.ones((1, 4), np.float32)
    tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    client.infer(model, [tensor])


def test_unloaded_versions_leave_no_series(server: ServerThread) -> None:
    with grpcclient.InferenceServerClient(server.url) as client:
        infer(client, KEPT)
        before = series(server)
        for _ in range(100):
            client.load_model(CYCLED)
            infer(client, CYCLED)
            client.unload_model(CYCLED)
        assert labelled(server, "model", CYCLED) == []
        assert series(server) == before
        # While loaded, the version has its series (the check above could not pass vacuously).
        client.load_model(CYCLED)
        infer(client, CYCLED)
        assert labelled(server, "model", CYCLED)
        client.unload_model(CYCLED)


def table(i: int) -> admin.RouteTable:
    """A table of the i-th change: variant (and shadow) names never seen before."""
    message = admin.RouteTable(model=KEPT, variants=[
        admin.Variant(name=f"v{i}", weight=50), admin.Variant(name=f"w{i}", weight=50)])
    if i % 3 == 0:
        message.shadow.target.CopyFrom(admin.Variant(name=f"s{i}"))
    if i % 5 == 0:
        message.canary.CopyFrom(admin.Canary(baseline=f"v{i}", candidate=f"w{i}",
                                             step_interval_secs=3600))
    return message


def test_route_changes_leave_only_the_table_in_forces_series(server: ServerThread) -> None:
    stub = admin_grpc.PeregrineAdminStub(grpc.insecure_channel(server.url))
    final = admin.RouteTable(model=KEPT, variants=[admin.Variant(name="only", weight=1)])
    final.shadow.target.CopyFrom(admin.Variant(name="copy"))
    with grpcclient.InferenceServerClient(server.url) as client:
        stub.SetRoute(admin.SetRouteRequest(table=final), timeout=10)
        infer(client, KEPT)
        before = series(server)
        for i in range(1000):
            stub.SetRoute(admin.SetRouteRequest(table=table(i)), timeout=10)
            if i % 10 == 0:
                infer(client, KEPT)  # the variant that serves it gets its series
        assert labelled(server, "variant", r"[vws]\d+")  # they were there
        stub.SetRoute(admin.SetRouteRequest(table=final), timeout=10)
        infer(client, KEPT)
    assert labelled(server, "variant", r"[vws]\d+") == []
    after = series(server)
    routing = {name for name in after | before
               if name.startswith(("peregrine_route", "peregrine_shadow", "peregrine_canary"))}
    assert routing and {n: after[n] for n in routing} == {n: before[n] for n in routing}
    stub.ClearRoute(admin.RouteRequest(model=KEPT), timeout=10)
    assert labelled(server, "variant", ".+") == []
