"""The Grafana dashboard (deploy/grafana/peregrine-dashboard.json) queries what the server
exports: one server with a routed model (two versions, a canary, a shadow) monitored for
drift, a model with a rate limit and a small tensor cap; some traffic, including a throttled
and a refused request; then every metric and every label of every panel's PromQL (and of the
template variables' queries) must be on /metrics."""

from __future__ import annotations

import json
import re
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpcclient
from onnx import TensorProto, helper
from prometheus_client.parser import text_string_to_metric_families
from tritonclient.utils import InferenceServerException

from server._pb import admin_pb2 as admin
from server._pb import admin_pb2_grpc as admin_grpc
from server.cli import main
from tests import model_factory
from tests.server_harness import ServerThread

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "peregrine-dashboard.json"
WIDTH, ROWS = 4, 16

# -- PromQL, as far as the dashboard writes it ---------------------------------------------------

_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_GROUPING = re.compile(r"\b(by|without)\s*\(([^)]*)\)")
#: Label lists that are not metric names: aggregations' and vector matching's.
_LABEL_LIST = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)\s*\"\"")
_KEYWORDS = frozenset({"by", "without", "on", "ignoring", "group_left", "group_right", "bool",
                       "and", "or", "unless", "offset"})


def _closing(text: str, start: int, opening: str = "(", closing: str = ")") -> int:
    """The index of the bracket that closes the one at ``start``."""
    depth = 0
    for i in range(start, len(text)):
        depth += {opening: 1, closing: -1}.get(text[i], 0)
        if depth == 0:
            return i
    raise AssertionError(f"unbalanced {opening} in {text!r}")


def selectors(expr: str) -> list[tuple[str, int, set[str]]]:
    """Each metric selector: its name, where it is, and the labels its matchers name."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # no string can pass for a name
    found = []
    i = 0
    while i < len(text):
        char = text[i]
        if char == "[":  # a range or subquery: $__rate_interval, 5m
            i = _closing(text, i, "[", "]") + 1
            continue
        if char == "$":  # a dashboard variable
            variable = _NAME.match(text, i + 1)
            i = variable.end() if variable else i + 1
            continue
        label_list = _LABEL_LIST.match(text, i)
        if label_list and (i == 0 or not (text[i - 1].isalnum() or text[i - 1] == "_")):
            i = label_list.end()
            continue
        name = _NAME.match(text, i) if (i == 0 or not (text[i - 1].isalnum()
                                                          or text[i - 1] in "_.")) else None
        if name is None:
            i += 1
            continue
        end = name.end()
        rest = text[end:].lstrip()
        if (name.group() in _KEYWORDS or rest.startswith("(")  # a function, an aggregation
                or _GROUPING.match(rest)):  # an aggregation with its grouping first
            i = end
            continue
        labels: set[str] = set()
        if rest.startswith("{"):
            start = text.index("{", end)
            close = _closing(text, start, "{", "}")
            labels = set(_MATCHER.findall(text[start + 1:close]))
            end = close + 1
        found.append((name.group(), i, labels))
        i = end
    return found


def groupings(expr: str) -> list[tuple[set[str], set[str]]]:
    """Each ``by``/``without`` clause: its labels, and the metrics it aggregates (those of the
    parenthesized argument that follows it)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    found = []
    for match in _GROUPING.finditer(text):
        start = text.index("(", match.end())
        argument = text[start:_closing(text, start) + 1]
        labels = {label.strip() for label in match.group(2).split(",") if label.strip()}
        found.append((labels, {name for name, _, _ in selectors(argument)}))
    return found


def test_the_promql_reader_finds_names_matchers_and_groupings() -> None:
    expr = ('histogram_quantile(0.99, sum by (model, le) (rate(a_bucket{model=~"$m", '
            'version!="x{y}"}[$__rate_interval]))) / on (model) b + topk(3, c) - d{le="1"}')
    assert [(n, sorted(ls)) for n, _, ls in selectors(expr)] == [
        ("a_bucket", ["model", "version"]), ("b", []), ("c", []), ("d", ["le"])]
    assert groupings(expr) == [({"model", "le"}, {"a_bucket"})]


# -- the server and its traffic ------------------------------------------------------------------


def identity(width: int) -> onnx.ModelProto:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["INPUT0"], ["OUTPUT0"])], "identity",
        [helper.make_tensor_value_info("INPUT0", TensorProto.FLOAT, ["N", width])],
        [helper.make_tensor_value_info("OUTPUT0", TensorProto.FLOAT, ["N", width])])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerThread]:
    repo = tmp_path_factory.mktemp("dashboard")
    config = model_factory.render_config(
        "m", max_batch_size=ROWS, version_policy="all { }",
        inputs=[model_factory.TensorSpec("INPUT0", "FP32", (WIDTH,))],
        outputs=[model_factory.TensorSpec("OUTPUT0", "FP32", (WIDTH,))],
        parameters={"drift_sample_rate": "1", "drift_window": str(ROWS)})
    for version in (1, 2):
        model_factory.write_model(repo, "m", identity(WIDTH), config, version)
    model_factory.identity_model(repo, "limited", "FP32")
    reference = repo.parent / "reference.npz"
    np.savez(reference, INPUT0=np.random.default_rng(1).normal(size=(500, WIDTH))
             .astype(np.float32))
    assert main(["drift", "profile", "--model", "m", "--version", "1", "--data",
                 str(reference), "--repository", str(repo)]) == 0
    with ServerThread(repo, model_rate_limit=("limited=0.001:1",),
                      max_tensor_elements=4096) as running:
        yield running


def fp32(data: Any) -> list[grpcclient.InferInput]:
    tensor = grpcclient.InferInput("INPUT0", list(data.shape), "FP32")
    tensor.set_data_from_numpy(data)
    return [tensor]


def drive(server: ServerThread) -> str:
    """Routed and sampled traffic, a throttled and a refused request; the scrape once the
    drift gauges are out."""
    table = admin.RouteTable(
        model="m",
        variants=[admin.Variant(name="a", version="1", weight=90),
                  admin.Variant(name="b", version="2", weight=10)],
        shadow=admin.Shadow(target=admin.Variant(name="s", version="2")),
        canary=admin.Canary(baseline="a", candidate="b", steps=[10, 50],
                            step_interval_secs=3600))
    with grpc.insecure_channel(server.url) as channel:
        admin_grpc.PeregrineAdminStub(channel).SetRoute(admin.SetRouteRequest(table=table),
                                                        timeout=10)
    rng = np.random.default_rng(2)
    with grpcclient.InferenceServerClient(server.url) as client:
        for _ in range(8):
            client.infer("m", fp32(rng.normal(size=(ROWS, WIDTH)).astype(np.float32)))
        client.infer("limited", fp32(np.ones((1, 2), dtype=np.float32)))
        for data in (np.ones((1, 2), dtype=np.float32),  # past the model's rate limit
                     np.ones((1, 5000), dtype=np.float32)):  # past --max-tensor-elements
            with pytest.raises(InferenceServerException) as err:
                client.infer("limited", fp32(data))
            assert str(err.value.status()) == "StatusCode.RESOURCE_EXHAUSTED"
    deadline = time.monotonic() + 30
    while True:  # the analyser closes the first drift window within a pass or two
        with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
            text: str = response.read().decode()
        if "peregrine_drift_score{" in text or time.monotonic() > deadline:
            return text
        time.sleep(0.1)


def exported(text: str) -> dict[str, set[str]]:
    """Every sample name on /metrics -> the label names its samples carry."""
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def test_every_metric_and_label_the_dashboard_queries_is_exported(server: ServerThread) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = [(p["title"], t["expr"]) for p in panels for t in p["targets"]]
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel
    for name in ("model", "version"):  # label_values(METRIC{...}, LABEL)
        query = variables[name]["query"]["query"]
        metric, label = re.fullmatch(r"label_values\((.*), (\w+)\)", query).groups()  # type: ignore[union-attr]
        exprs.append((f"variable {name}", f"sum by ({label}) ({metric})"))

    metrics = exported(drive(server))
    missing = []
    for title, expr in exprs:
        found = selectors(expr)
        assert found, f"{title}: no metric in {expr}"
        for metric, _, labels in found:
            if metric not in metrics:
                missing.append(f"{title}: {metric}")
            elif labels - metrics[metric]:
                missing.append(f"{title}: {metric} has no {sorted(labels - metrics[metric])}")
        for labels, inside in groupings(expr):
            for metric in inside & metrics.keys():
                if labels - metrics[metric]:
                    missing.append(f"{title}: {metric} has no {sorted(labels - metrics[metric])}")
    assert not missing, "\n".join(missing)
