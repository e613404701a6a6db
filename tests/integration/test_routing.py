"""Traffic routing end to end (issue 6): a real server, tritonclient for inference and the
PeregrineAdmin service (generated stubs) or `peregrine route` for control.

Models: ``m`` has versions whose output names them (``OUTPUT0 = INPUT0 * factor``: v1 x1, v2
x2, v3 x2 again, so v2 and v3 are identical); ``twin`` (x10) and ``failing`` (every inference
fails) share its signature, ``wide`` does not. ``fast`` (about 0.3 ms a batch) and ``sluggish``
(about 60 ms) are slow_model builds with one signature of their own.

Only behaviour is asserted (which variant answered, counts, rollbacks, advances), never a
latency. Split counts are checked within 5 standard deviations of the binomial count: with a
fresh random generator per run, each such check fails by chance with probability < 6e-7.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.routing import store as route_store
from server.routing.splitter import pick_sticky
from server.routing.store import ROUTING_FILE
from tests import model_factory
from tests.server_harness import ServerThread

ROOT = Path(__file__).resolve().parents[2]
WIDTH = model_factory.SCALED_WIDTH
FAST_MS, SLUGGISH_MS = 0.3, 60.0
HEADER = "x-routing-key"
ROUTER_LOGGER = "server.routing.router"
StartServer = Callable[..., ServerThread]


# -- repository and servers --------------------------------------------------------------------


def build_repo(repo: Path, *, extras: bool = True) -> Path:
    model_factory.scaled_model_version(repo, "m", 1, 1.0, with_config=True,
                                       version_policy="all { }")
    model_factory.scaled_model_version(repo, "m", 2, 2.0)
    model_factory.scaled_model_version(repo, "m", 3, 2.0)
    if extras:
        model_factory.scaled_model_version(repo, "twin", 1, 10.0, with_config=True)
        model_factory.failing_model(repo, "failing")
        model_factory.identity_model(repo, "wide", "FP32")
        model_factory.slow_model(repo, "fast", delay_ms=FAST_MS)
        model_factory.slow_model(repo, "sluggish", delay_ms=SLUGGISH_MS)
    return repo


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = build_repo(tmp_path_factory.mktemp("routing"))
    with ServerThread(repo, grpc_header_forward_pattern=f"^{HEADER}$") as running:
        yield running


@pytest.fixture
def server(shared_server: ServerThread) -> Iterator[ServerThread]:
    """The shared server, with every routing table cleared after the test."""
    yield shared_server
    stub = admin_stub(shared_server)
    for status in stub.ListRoutes(admin.ListRoutesRequest(), timeout=10).routes:
        stub.ClearRoute(admin.RouteRequest(model=status.table.model), timeout=10)


@pytest.fixture
def client(shared_server: ServerThread) -> Iterator[grpcclient.InferenceServerClient]:
    with grpcclient.InferenceServerClient(shared_server.url) as running:
        yield running


# -- helpers --------------------------------------------------------------------------------------


def admin_stub(server: ServerThread) -> admin_grpc.PeregrineAdminStub:
    return admin_grpc.PeregrineAdminStub(grpc.insecure_channel(server.url))


def variant(name: str, version: str = "", weight: float = 0.0, model: str = "") -> admin.Variant:
    return admin.Variant(name=name, model=model, version=version, weight=weight)


def route_table(model: str, *variants: admin.Variant, **fields: Any) -> admin.RouteTable:
    return admin.RouteTable(model=model, variants=list(variants), **fields)


def set_route(server: ServerThread, table: admin.RouteTable, user: str = "tester"
              ) -> admin.RouteStatus:
    status: admin.RouteStatus = admin_stub(server).SetRoute(
        admin.SetRouteRequest(table=table), timeout=10,
        metadata=[("x-peregrine-user", user)],
    )
    return status


def get_route(server: ServerThread, model: str) -> admin.RouteStatus:
    status: admin.RouteStatus = admin_stub(server).GetRoute(admin.RouteRequest(model=model),
                                                            timeout=10)
    return status


def weights(status: admin.RouteStatus) -> dict[str, float]:
    return {v.name: v.weight for v in status.table.variants}


def inputs_for(x: np.ndarray) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x)
    return [tensor]


def row(width: int = WIDTH, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).random((1, width), dtype=np.float32) + 0.5


def infer(client: grpcclient.InferenceServerClient, model: str = "m", x: np.ndarray | None = None,
          **kwargs: Any) -> tuple[str | None, np.ndarray]:
    """(routing_variant or None, OUTPUT0)."""
    x = row() if x is None else x
    result = client.infer(model, inputs_for(x), **kwargs)
    parameters = result.get_response().parameters
    chosen = parameters["routing_variant"].string_param if "routing_variant" in parameters \
        else None
    return chosen, result.as_numpy("OUTPUT0")


def factor(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.round(y[0, 0] / x[0, 0], 3))


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def metric(server: ServerThread, name: str, *, default: float | None = None, **labels: str
           ) -> float:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                return float(sample.value)
    if default is not None:
        return default
    raise AssertionError(f"no sample {name}{labels} on /metrics")


def within_5_sigma(count: int, n: int, p: float) -> bool:
    return abs(count - n * p) <= 5 * math.sqrt(n * p * (1 - p))


class Load:
    """A client thread sending unversioned requests until stopped; counts what came back."""

    def __init__(self, server: ServerThread, model: str, x: np.ndarray,
                 pause: float = 0.0) -> None:
        self.server, self.model, self.x, self.pause = server, model, x, pause
        self.variants: Counter[str | None] = Counter()
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with grpcclient.InferenceServerClient(self.server.url) as client:
            while not self._stop.is_set():
                try:
                    chosen, _ = infer(client, self.model, self.x)
                    self.variants[chosen] += 1
                except InferenceServerException:
                    self.errors += 1
                if self.pause:
                    time.sleep(self.pause)

    def __enter__(self) -> Load:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def replace_file(path: Path, text: str) -> None:
    """As an operator's editor or a deploy tool should: the poller never sees half a file."""
    temporary = path.with_name(".routing.json.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def rejected(server: ServerThread, table: admin.RouteTable) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as info:
        set_route(server, table)
    error: grpc.RpcError = info.value
    return error


# -- splits -------------------------------------------------------------------------------------


def test_ab_split_is_honoured_counted_and_audited(
    server: ServerThread, client: grpcclient.InferenceServerClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    status = set_route(server, route_table("m", variant("a", "1", 70), variant("b", "2", 30)),
                       user="alice")
    assert weights(status) == {"a": 70, "b": 30}
    before = {v: metric(server, "peregrine_route_requests_total", default=0.0, model="m",
                        variant=v) for v in "ab"}
    audit = [r for r in caplog.records if r.getMessage() == "routing changed"]
    assert audit and audit[-1].who == "alice"  # type: ignore[attr-defined]
    assert audit[-1].action == "set" and audit[-1].model == "m"  # type: ignore[attr-defined]
    assert '"a"' in audit[-1].table  # type: ignore[attr-defined]

    n = 400
    x = row()
    seen: Counter[str | None] = Counter()
    for _ in range(n):
        chosen, y = infer(client, "m", x)
        seen[chosen] += 1
        # The variant named in the response is the one that answered.
        assert factor(x, y) == {"a": 1.0, "b": 2.0}[chosen or ""]
    assert set(seen) == {"a", "b"}
    assert within_5_sigma(seen["a"], n, 0.7), seen
    live = {v.name: v for v in get_route(server, "m").variants}
    assert live["a"].requests == seen["a"] and live["b"].requests == seen["b"]
    assert live["a"].errors == 0 and live["a"].p99_ms > 0
    for name in "ab":
        counted = metric(server, "peregrine_route_requests_total", model="m", variant=name)
        assert counted - before[name] >= seen[name]
        assert metric(server, "peregrine_route_weight", model="m", variant=name) == \
            {"a": 70, "b": 30}[name]
    assert metric(server, "peregrine_route_latency_seconds_count", model="m", variant="a") > 0


def test_a_request_naming_a_version_gets_exactly_it(
    server: ServerThread, client: grpcclient.InferenceServerClient,
) -> None:
    set_route(server, route_table("m", variant("a", "1", 0), variant("b", "2", 100)))
    x = row()
    for version, expected in (("1", 1.0), ("3", 2.0), ("1", 1.0)):
        for _ in range(10):
            chosen, y = infer(client, "m", x, model_version=version)
            assert chosen is None
            assert factor(x, y) == expected
    assert infer(client, "m", x)[0] == "b"
    # Without a table the version policy's latest (v3) serves and nothing is named.
    admin_stub(server).ClearRoute(admin.RouteRequest(model="m"), timeout=10)
    chosen, y = infer(client, "m", x)
    assert chosen is None and factor(x, y) == 2.0


def check_sticky(client: grpcclient.InferenceServerClient, names: tuple[str, ...],
                 weights_: tuple[float, ...], send: Callable[[str], str | None]) -> None:
    chosen: dict[str, set[str | None]] = {}
    for i in range(24):
        key = f"user-{i}"
        chosen[key] = {send(key) for _ in range(4)}
    assert all(len(v) == 1 for v in chosen.values()), chosen
    # The server's choice is the stable hash's (so it survives restarts and replicas).
    assert {k: v.pop() for k, v in chosen.items()} == {
        k: names[pick_sticky(k, names, weights_)] for k in chosen
    }


def test_sticky_key_by_request_parameter(
    server: ServerThread, client: grpcclient.InferenceServerClient,
) -> None:
    set_route(server, route_table("m", variant("a", "1", 50), variant("b", "2", 50)))
    check_sticky(client, ("a", "b"), (50, 50),
                 lambda key: infer(client, "m", parameters={"routing_key": key})[0])


def test_sticky_key_by_header(
    server: ServerThread, client: grpcclient.InferenceServerClient,
) -> None:
    set_route(server, route_table("m", variant("a", "1", 50), variant("b", "2", 25),
                                  variant("t", weight=25, model="twin"), sticky_parameter=HEADER))
    check_sticky(client, ("a", "b", "t"), (50, 25, 25),
                 lambda key: infer(client, "m", headers={HEADER: key})[0])
    # The other model of the same signature answers for its variant.
    x = row()
    key = next(f"k{i}" for i in range(1000)
               if pick_sticky(f"k{i}", ("a", "b", "t"), (50, 25, 25)) == 2)
    chosen, y = infer(client, "m", x, headers={HEADER: key})
    assert chosen == "t" and factor(x, y) == 10.0


# -- validation -------------------------------------------------------------------------------


def test_bad_tables_are_rejected_with_a_clear_message_and_the_old_table_stays(
    server: ServerThread, client: grpcclient.InferenceServerClient,
) -> None:
    good = route_table("m", variant("a", "1", 90), variant("b", "2", 10))
    set_route(server, good)
    path = server.settings.model_repository / "m" / ROUTING_FILE
    on_disk = path.read_text()
    shadow_fraction = route_table("m", variant("a", "1", 1))
    shadow_fraction.shadow.target.CopyFrom(variant("s", "3"))
    shadow_fraction.shadow.fraction = 2.0
    cases = [
        (route_table("m", variant("a", "1", 50), variant("b", "9", 50)),
         "variant 'b': Request for unknown model: 'm' version 9 is not found"),
        (route_table("nope", variant("a", "1", 1)), "Request for unknown model: 'nope'"),
        (route_table("m", variant("a", "1", 1), variant("a", "2", 1)), "'a' appears twice"),
        (route_table("m", variant("a", "1", 1), variant("b", "2", -5)),
         "weight must be a finite number >= 0"),
        (route_table("m", variant("a", "1", 1), variant("b", "2", float("nan"))),
         "weight must be a finite number >= 0"),
        (route_table("m", variant("a", "1", 0), variant("b", "2", 0)), "weights add up to 0"),
        (route_table("m", variant("a", "1", 1), variant("w", model="wide", weight=1)),
         "model 'wide' does not have the inputs and outputs of 'm'"),
        (shadow_fraction, "shadow fraction must be within (0, 1]"),
        (route_table("m", variant("a", "1", 1), variant("b", "2", 0),
                     canary=admin.Canary(baseline="a", candidate="c")),
         "canary candidate 'c' is not a variant"),
        (route_table("m", variant("a", "1", 1), variant("b", "2", 0),
                     canary=admin.Canary(baseline="a", candidate="b", steps=[50, 10])),
         "canary steps must rise"),
    ]
    for table, message in cases:
        error = rejected(server, table)
        assert error.code() is grpc.StatusCode.INVALID_ARGUMENT, (table, error)
        assert message in (error.details() or ""), (message, error.details())
    status = get_route(server, "m")
    assert status.table == good
    assert path.read_text() == on_disk
    assert infer(client, "m")[0] in {"a", "b"}


def test_clear_and_the_errors_of_missing_tables(server: ServerThread) -> None:
    stub = admin_stub(server)
    set_route(server, route_table("m", variant("a", "1", 1)))
    path = server.settings.model_repository / "m" / ROUTING_FILE
    assert path.exists()
    cleared = stub.ClearRoute(admin.RouteRequest(model="m"), timeout=10)
    assert cleared.table.model == "m" and not cleared.table.variants
    assert not path.exists()
    # No stale weight is left on /metrics.
    assert metric(server, "peregrine_route_weight", default=-1.0, model="m", variant="a") == -1
    for call in (stub.GetRoute, stub.ClearRoute, stub.Promote, stub.Rollback):
        with pytest.raises(grpc.RpcError) as info:
            call(admin.RouteRequest(model="m"), timeout=10)
        assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        assert "model 'm' has no routing table" in (info.value.details() or "")


# -- persistence --------------------------------------------------------------------------------


def test_the_table_persists_and_is_reloaded_after_a_restart(
    tmp_path: Path, start_server: StartServer,
) -> None:
    repo = build_repo(tmp_path, extras=False)
    first = start_server(repo)
    table = route_table("m", variant("old", "1", 0), variant("new", "2", 100),
                        sticky_parameter="user")
    set_route(first, table)
    first.stop()
    saved = json.loads((repo / "m" / ROUTING_FILE).read_text())
    assert saved["sticky_parameter"] == "user"
    assert [v["name"] for v in saved["variants"]] == ["old", "new"]
    second = start_server(repo)
    assert get_route(second, "m").table == table
    with grpcclient.InferenceServerClient(second.url) as client:
        x = row()
        chosen, y = infer(client, "m", x)
        assert chosen == "new" and factor(x, y) == 2.0


def test_poll_mode_applies_an_edited_routing_file_and_rejects_a_bad_one(
    tmp_path: Path, start_server: StartServer, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    repo = build_repo(tmp_path, extras=False)
    running = start_server(repo, model_control_mode="poll", repository_poll_secs=0.1)
    set_route(running, route_table("m", variant("a", "1", 100), variant("b", "2", 0)))
    path = repo / "m" / ROUTING_FILE

    edited = json.loads(path.read_text())
    edited["variants"][0]["weight"] = 0
    edited["variants"][1]["weight"] = 100
    replace_file(path, json.dumps(edited))
    wait_until(lambda: weights(get_route(running, "m")) == {"a": 0, "b": 100},
               "the edited routing file to apply")
    with grpcclient.InferenceServerClient(running.url) as client:
        assert infer(client, "m")[0] == "b"
    applied = [r for r in caplog.records if r.getMessage() == "routing changed"]
    assert applied[-1].who == "routing file"  # type: ignore[attr-defined]

    def rejections() -> int:
        return sum(r.getMessage() == "routing file rejected" for r in caplog.records)

    for bad, reason in (
        ({**edited, "variants": [{"name": "a", "version": "9", "weight": 1}]},
         "version 9 is not found"),
        ("{ not json", ROUTING_FILE),
    ):
        count = rejections()
        replace_file(path, bad if isinstance(bad, str) else json.dumps(bad))
        wait_until(lambda count=count: rejections() > count, "the bad routing file rejected")  # type: ignore[misc]
        last = [r for r in caplog.records if r.getMessage() == "routing file rejected"][-1]
        assert reason in last.reason  # type: ignore[attr-defined]
        assert weights(get_route(running, "m")) == {"a": 0, "b": 100}
    # Removing the file clears the table.
    path.unlink()
    wait_until(lambda: not admin_stub(running).ListRoutes(admin.ListRoutesRequest(),
                                                          timeout=10).routes,
               "the table cleared after the file went")


# -- shadow ---------------------------------------------------------------------------------------


def burst(server: ServerThread, x: np.ndarray, n: int) -> list[tuple[str | None, np.ndarray]]:
    """n concurrent unversioned requests to 'fast'; every answer (errors raise)."""
    local = threading.local()

    def one(_: int) -> tuple[str | None, np.ndarray]:
        if not hasattr(local, "client"):
            local.client = grpcclient.InferenceServerClient(server.url)
        return infer(local.client, "fast", x)

    with ThreadPoolExecutor(max_workers=8) as pool:
        return list(pool.map(one, range(n)))


def test_a_slow_shadow_never_touches_callers_and_drops_under_a_burst(
    server: ServerThread,
) -> None:
    x = row(model_factory.SLOW_WIDTH)
    expected = model_factory.slow_model_expected(x, FAST_MS)
    n = 64

    def served(model: str, kind: str = "success") -> float:
        return metric(server, "nv_inference_request_success", model=model) if kind == "success" \
            else sum(metric(server, "nv_inference_request_failure", model=model, reason=r)
                     for r in ("REJECTED", "CANCELED", "BACKEND", "OTHER"))

    # Without a shadow, as the reference: every caller answered by the primary.
    set_route(server, route_table("fast", variant("p", weight=100)))
    ok_before, failed_before = served("fast"), served("fast", "failure")
    sluggish_before = served("sluggish")
    for chosen, y in burst(server, x, n):
        assert chosen == "p" and np.array_equal(y, expected)
    assert served("fast") - ok_before == n and served("fast", "failure") == failed_before
    assert served("sluggish") == sluggish_before

    # With a shadow 200 times slower and room for only 2 waiting copies: the same.
    table = route_table("fast", variant("p", weight=100))
    table.shadow.target.CopyFrom(variant("slow", model="sluggish"))
    table.shadow.max_pending = 2
    set_route(server, table)
    for chosen, y in burst(server, x, n):
        assert chosen == "p" and np.array_equal(y, expected)  # never the shadow's answer
    assert served("fast") - ok_before == 2 * n and served("fast", "failure") == failed_before

    def figures() -> admin.ShadowStatus:
        return get_route(server, "fast").shadow

    wait_until(lambda: figures().mirrored + figures().dropped == n
               and figures().compared + figures().failed == figures().mirrored,
               "every copy mirrored or dropped, and compared")
    shadow = figures()
    assert shadow.dropped > 0 and shadow.compared > 0 and shadow.failed == 0
    # The copies went through the data plane like any request: the shadow model's statistics
    # count them (ModelStatistics and the nv_* families alike).
    assert metric(server, "nv_inference_count", model="sluggish") == shadow.compared
    assert served("sluggish") - sluggish_before == shadow.compared
    with grpcclient.InferenceServerClient(server.url) as own:
        stats = own.get_inference_statistics("sluggish", as_json=True)["model_stats"][0]
    assert int(stats["inference_stats"]["success"]["count"]) == shadow.compared
    # The shadow's outputs differ (another power of the permutation): measured, not returned.
    assert shadow.max_abs_diff > 0
    def shadow_metric(name: str) -> float:
        return metric(server, f"peregrine_shadow_{name}", model="fast", variant="slow")

    assert shadow_metric("mirrored_total") == shadow.mirrored
    assert shadow_metric("dropped_total") == shadow.dropped
    assert shadow_metric("max_abs_diff") == pytest.approx(shadow.max_abs_diff)


def test_identical_shadow_agrees_and_a_failing_shadow_is_only_counted(
    server: ServerThread, client: grpcclient.InferenceServerClient,
) -> None:
    table = route_table("m", variant("v2", "2", 100))
    table.shadow.target.CopyFrom(variant("v3", "3"))
    status = set_route(server, table)
    assert status.shadow.mirrored == 0

    # A different input per request, several in flight (so batched together): a primary's
    # output compared later must still be that request's own.
    def one(seed: int) -> None:
        with grpcclient.InferenceServerClient(server.url) as own:
            x = row(seed=seed)
            chosen, y = infer(own, "m", x)
            assert chosen == "v2" and np.array_equal(y, x * 2)

    with ThreadPoolExecutor(max_workers=6) as pool:
        list(pool.map(one, range(30)))
    wait_until(lambda: get_route(server, "m").shadow.compared == 30, "30 compared copies")
    shadow = get_route(server, "m").shadow
    assert (shadow.mirrored, shadow.dropped, shadow.failed) == (30, 0, 0)
    assert shadow.agreement == 1.0
    assert shadow.max_abs_diff == 0.0 and shadow.mean_abs_diff == 0.0
    assert shadow.max_rel_diff == 0.0
    assert metric(server, "peregrine_shadow_agreement", model="m", variant="v3") == 1.0

    # A sampled shadow: about half the requests are copied.
    x = row()
    table.shadow.fraction = 0.5
    set_route(server, table)
    for _ in range(200):
        infer(client, "m", x)
    wait_until(lambda: get_route(server, "m").shadow.compared >= 30 + 1, "sampled copies")
    wait_until(lambda: get_route(server, "m").shadow.mirrored
               == get_route(server, "m").shadow.compared, "sampled copies compared")
    assert within_5_sigma(get_route(server, "m").shadow.mirrored - 30, 200, 0.5)

    # A shadow whose every request fails: callers never see it; its failures are counted.
    table = route_table("m", variant("v1", "1", 100))
    table.shadow.target.CopyFrom(variant("broken", model="failing"))
    set_route(server, table)
    for _ in range(20):
        chosen, y = infer(client, "m", x)
        assert chosen == "v1" and factor(x, y) == 1.0
    wait_until(lambda: get_route(server, "m").shadow.failed == 20, "20 failed copies")
    shadow = get_route(server, "m").shadow
    assert shadow.compared == 0 and shadow.mirrored == 20
    assert metric(server, "peregrine_shadow_failed_total", model="m", variant="broken") == 20
    live = {v.name: v for v in get_route(server, "m").variants}
    assert live["v1"].errors == 0


# -- canary ---------------------------------------------------------------------------------------


def canary_table(model: str, baseline: admin.Variant, candidate: admin.Variant,
                 **plan: Any) -> admin.RouteTable:
    return route_table(model, baseline, candidate,
                       canary=admin.Canary(baseline=baseline.name, candidate=candidate.name,
                                           **plan))


def test_a_healthy_canary_advances_through_its_steps_to_promoted(
    server: ServerThread, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    # A lax p99 guard: both variants are the same tiny model, and on a shared machine one
    # stalled request can dominate a p99 over a handful of requests.
    table = canary_table("m", variant("stable", "1", 100), variant("next", "2", 0),
                         steps=[20, 50, 100], step_interval_secs=0.5, min_requests=5,
                         max_p99_ratio=100)
    status = set_route(server, table)
    assert status.canary_state == "running" and status.canary_step == 0
    assert weights(status) == {"stable": 80, "next": 20}
    assert metric(server, "peregrine_canary_weight_percent", model="m") == 20
    steps_seen = set()
    with Load(server, "m", row(), pause=0.003) as load:
        def promoted() -> bool:
            now = get_route(server, "m")
            steps_seen.add((now.canary_step, weights(now)["next"]))
            return now.canary_state == "promoted"

        wait_until(promoted, "the canary promoted", timeout=30)
    assert load.errors == 0
    assert {(1, 50)} <= steps_seen
    final = get_route(server, "m")
    assert weights(final) == {"stable": 0, "next": 100}
    assert not final.table.HasField("canary")  # a restart does not run the rollout again
    saved = json.loads((server.settings.model_repository / "m" / ROUTING_FILE).read_text())
    assert "canary" not in saved
    assert metric(server, "peregrine_canary_weight_percent", model="m") == 100
    steps = [r for r in caplog.records if r.getMessage() == "canary step"]
    assert [r.candidate_percent for r in steps][-2:] == [50, 100]  # type: ignore[attr-defined]
    with grpcclient.InferenceServerClient(server.url) as client:
        assert {infer(client, "m")[0] for _ in range(20)} == {"next"}


def run_until_rolled_back(server: ServerThread, model: str, x: np.ndarray) -> Load:
    with Load(server, model, x) as load:
        wait_until(lambda: get_route(server, model).canary_state == "rolled_back",
                   "the canary rolled back", timeout=30)
    return load


def test_a_slow_canary_rolls_back_by_itself_on_p99(
    server: ServerThread, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    table = canary_table("fast", variant("base", weight=100), variant("cand", model="sluggish"),
                         steps=[50, 100], step_interval_secs=60, min_requests=5,
                         max_p99_ratio=3)
    set_route(server, table)
    run_until_rolled_back(server, "fast", row(model_factory.SLOW_WIDTH))
    status = get_route(server, "fast")
    assert "p99" in status.canary_reason and "exceeds 3.00 x baseline" in status.canary_reason
    assert weights(status) == {"base": 100, "cand": 0}
    assert not status.table.HasField("canary")
    assert metric(server, "peregrine_canary_weight_percent", model="fast") == 0
    logged = [r for r in caplog.records if r.getMessage() == "canary rolled back"]
    assert logged and logged[-1].reason == status.canary_reason  # type: ignore[attr-defined]
    assert logged[-1].levelno == logging.WARNING
    with grpcclient.InferenceServerClient(server.url) as client:
        assert {infer(client, "fast", row(model_factory.SLOW_WIDTH))[0]
                for _ in range(10)} == {"base"}


def test_a_failing_canary_rolls_back_by_itself_on_errors(server: ServerThread) -> None:
    table = canary_table("m", variant("base", "1", 100), variant("bad", model="failing"),
                         steps=[50, 100], step_interval_secs=60, min_requests=5)
    set_route(server, table)
    load = run_until_rolled_back(server, "m", row())
    assert load.errors > 0  # the candidate's failures did reach its callers, until rollback
    status = get_route(server, "m")
    assert "error rate" in status.canary_reason
    assert weights(status) == {"base": 100, "bad": 0}
    live = {v.name: v for v in status.variants}
    assert live["bad"].errors >= 5 and live["base"].errors == 0
    assert metric(server, "peregrine_route_errors_total", model="m", variant="bad") >= 5


def test_bad_requests_sent_to_the_candidate_never_roll_it_back(server: ServerThread) -> None:
    """A client that lands its requests on the candidate (a sticky key) and makes them fail
    (INVALID_ARGUMENT: the wrong width) must not force a rollback: only the server's faults
    count against a variant."""
    table = canary_table("m", variant("base", "1", 100), variant("cand", "2", 0),
                         steps=[50, 100], step_interval_secs=0.5, min_requests=5,
                         max_p99_ratio=100)
    names, first_step = ("base", "cand"), (50.0, 50.0)
    key = next(f"attacker-{i}" for i in range(1000)
               if names[pick_sticky(f"attacker-{i}", names, first_step)] == "cand")
    before = metric(server, "peregrine_route_client_errors_total", default=0.0, model="m",
                    variant="cand")
    set_route(server, table)
    refused = 0
    with Load(server, "m", row(), pause=0.01) as load, \
            grpcclient.InferenceServerClient(server.url) as attacker:
        def promoted() -> bool:
            nonlocal refused
            for _ in range(4):
                with pytest.raises(InferenceServerException, match="INPUT0"):
                    infer(attacker, "m", row(WIDTH + 3), parameters={"routing_key": key})
                refused += 1
            return get_route(server, "m").canary_state != "running"

        wait_until(promoted, "the canary decided", timeout=30)
    status = get_route(server, "m")
    assert status.canary_state == "promoted", status.canary_reason
    assert load.errors == 0
    assert metric(server, "peregrine_route_client_errors_total", model="m",
                  variant="cand") - before >= refused // 2  # the rest reached "base"
    assert metric(server, "peregrine_route_errors_total", default=0.0, model="m",
                  variant="cand") == 0


def test_a_table_the_repository_cannot_store_applies_in_memory_and_rolls_back(
    tmp_path: Path, start_server: StartServer, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A read-only repository (deploy/kubernetes mounts it so): routing still works, a canary
    still rolls back, and the failure to persist is reported, not hidden."""
    caplog.set_level(logging.ERROR, logger=ROUTER_LOGGER)
    repo = build_repo(tmp_path, extras=False)
    model_factory.failing_model(repo, "failing")
    running = start_server(repo)
    set_route(running, route_table("m", variant("a", "1", 100)))
    path = repo / "m" / ROUTING_FILE
    on_disk = path.read_text()

    def read_only(target: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(target))

    monkeypatch.setattr(route_store, "write_atomically", read_only)
    status = set_route(running, canary_table(
        "m", variant("base", "1", 100), variant("bad", model="failing"), steps=[50, 100],
        step_interval_secs=60, min_requests=5))
    assert status.canary_state == "running" and weights(status) == {"base": 50, "bad": 50}
    assert "Read-only file system" in status.persist_error
    assert str(path) in status.persist_error
    logged = [r for r in caplog.records if r.getMessage() == "routing change not persisted"]
    assert logged and "Read-only file system" in logged[-1].error  # type: ignore[attr-defined]

    run_until_rolled_back(running, "m", row())
    status = get_route(running, "m")
    assert weights(status) == {"base": 100, "bad": 0} and "error rate" in status.canary_reason
    assert "Read-only file system" in status.persist_error
    assert path.read_text() == on_disk  # the file still holds the last table it could
    with grpcclient.InferenceServerClient(running.url) as client:
        assert {infer(client, "m")[0] for _ in range(10)} == {"base"}
    done = route_cli(running, "status", "m")
    assert done.returncode == 0, done.stderr
    assert "WARNING: routing file not persisted ([Errno 30] Read-only file system" in done.stdout


def test_promote_rollback_and_list_rpcs(server: ServerThread,
                                        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    stub = admin_stub(server)
    bob = [("x-peregrine-user", "bob")]
    table = canary_table("m", variant("a", "1", 100), variant("b", "2", 0),
                         steps=[10, 50, 100], step_interval_secs=3600)
    set_route(server, table)
    set_route(server, route_table("twin", variant("only", "1", 1)))
    listed = stub.ListRoutes(admin.ListRoutesRequest(), timeout=10).routes
    assert [s.table.model for s in listed] == ["m", "twin"]
    assert listed[0].canary_state == "running"

    status = stub.Promote(admin.RouteRequest(model="m"), timeout=10, metadata=bob)
    assert (status.canary_state, status.canary_step) == ("running", 1)
    assert status.canary_reason == "promoted by bob"
    assert weights(status) == {"a": 50, "b": 50}
    status = stub.Promote(admin.RouteRequest(model="m"), timeout=10, metadata=bob)
    assert status.canary_state == "promoted" and weights(status) == {"a": 0, "b": 100}
    with pytest.raises(grpc.RpcError) as info:
        stub.Promote(admin.RouteRequest(model="m"), timeout=10)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    assert "no running canary" in (info.value.details() or "")

    set_route(server, table)
    status = stub.Rollback(admin.RouteRequest(model="m"), timeout=10, metadata=bob)
    assert status.canary_state == "rolled_back" and status.canary_reason == "rolled back by bob"
    assert weights(status) == {"a": 100, "b": 0}
    assert metric(server, "peregrine_canary_weight_percent", model="m") == 0
    with pytest.raises(grpc.RpcError) as info:
        stub.Rollback(admin.RouteRequest(model="m"), timeout=10)
    assert info.value.code() is grpc.StatusCode.FAILED_PRECONDITION
    actions = [(r.who, r.action) for r in caplog.records  # type: ignore[attr-defined]
               if r.getMessage() == "routing changed" and r.model == "m"]  # type: ignore[attr-defined]
    assert ("canary", "promote") in actions and ("canary", "rollback") in actions


# -- the command ----------------------------------------------------------------------------------


def route_cli(server: ServerThread, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "server.cli", "route", "--url", server.url, *args],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
    )


def test_peregrine_route_commands(server: ServerThread, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=ROUTER_LOGGER)
    done = route_cli(server, "set", "m", "--variant", "a=1:90", "--variant", "b=2:10",
                     "--shadow", "s=3:0.5", "--user", "carol")
    assert done.returncode == 0, done.stderr
    assert "routing table of 'm' applied" in done.stdout
    assert weights(get_route(server, "m")) == {"a": 90, "b": 10}
    assert get_route(server, "m").table.shadow.fraction == 0.5
    audit = [r for r in caplog.records if r.getMessage() == "routing changed"]
    assert audit[-1].who == "carol"  # type: ignore[attr-defined]

    # Figures are per variant name since the server started (other tests used "a" and "b").
    before = sum(v.requests for v in get_route(server, "m").variants)
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(10):
            infer(client, "m")
    done = route_cli(server, "status", "m", "--json")
    assert done.returncode == 0, done.stderr
    status = json.loads(done.stdout)
    assert sum(int(v["requests"]) for v in status["variants"]) == before + 10
    assert status["table"]["shadow"]["target"]["version"] == "3"
    done = route_cli(server, "status")
    assert done.returncode == 0, done.stderr
    assert "model m" in done.stdout and "shadow s -> m:3" in done.stdout
    assert "VARIANT" in done.stdout and "P99_MS" in done.stdout

    done = route_cli(server, "set", "m", "--variant", "a=1:90", "--variant", "b=7:10")
    assert done.returncode == 1
    assert ("INVALID_ARGUMENT: variant 'b': Request for unknown model: 'm' version 7 is not "
            "found") in done.stderr
    assert weights(get_route(server, "m")) == {"a": 90, "b": 10}
    done = route_cli(server, "promote", "m")
    assert done.returncode == 1 and "FAILED_PRECONDITION" in done.stderr

    done = route_cli(server, "set", "m", "--variant", "a=1:100", "--variant", "b=2:0",
                     "--canary", "a:b", "--steps", "5,100", "--step-interval", "3600")
    assert done.returncode == 0, done.stderr
    assert "canary running: a -> b, step 1 of [5,100]" in done.stdout
    done = route_cli(server, "rollback", "m", "--user", "dave")
    assert done.returncode == 0, done.stderr
    assert "canary rolled_back" in done.stdout and "rolled back by dave" in done.stdout
    done = route_cli(server, "clear", "m")
    assert done.returncode == 0 and "cleared" in done.stdout
    done = route_cli(server, "status", "m")
    assert done.returncode == 1
    assert "FAILED_PRECONDITION: model 'm' has no routing table" in done.stderr
