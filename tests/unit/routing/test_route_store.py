"""server.routing.store.RouteStore: routing.json beside config.pbtxt, atomic, change-detected."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from google.protobuf import json_format

from server._pb import admin_pb2 as admin
from server.errors import InvalidInput
from server.routing.store import ROUTING_FILE, RouteStore
from server.routing.table import Canary, RouteTable, Shadow, Variant


@pytest.fixture
def store(tmp_path: Path) -> RouteStore:
    (tmp_path / "m").mkdir()
    return RouteStore(lambda model: tmp_path / model)


def sample() -> RouteTable:
    return RouteTable(
        model="m", sticky_parameter="user",
        variants=(Variant(name="a", version="1", weight=90),
                  Variant(name="b", model="twin", version="", weight=10)),
        shadow=Shadow(target=Variant(name="s", version="2"), fraction=0.25, max_pending=7,
                      max_pending_bytes=2**33),
        canary=Canary(baseline="a", candidate="b", steps=(5.0, 50.0, 100.0), min_requests=3),
    )


def sample_message() -> admin.RouteTable:
    """The same table as the admin API's message."""
    table = admin.RouteTable(model="m", sticky_parameter="user")
    table.variants.add(name="a", version="1", weight=90)
    table.variants.add(name="b", model="twin", version="", weight=10)
    table.shadow.target.CopyFrom(admin.Variant(name="s", version="2"))
    table.shadow.fraction = 0.25
    table.shadow.max_pending = 7
    table.shadow.max_pending_bytes = 2**33  # protobuf's JSON writes it as a string
    table.canary.baseline = "a"
    table.canary.candidate = "b"
    table.canary.steps.extend([5, 50, 100])
    table.canary.min_requests = 3
    return table


def bump_mtime(path: Path) -> None:
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))


def test_round_trip(store: RouteStore, tmp_path: Path) -> None:
    store.write(sample())
    path = tmp_path / "m" / ROUTING_FILE
    assert store.path("m") == path
    assert json.loads(path.read_text())["variants"][0] == {"name": "a", "version": "1",
                                                           "weight": 90.0}
    assert store.read("m") == sample()
    # No temporary file is left beside it.
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [ROUTING_FILE]


@pytest.mark.parametrize("field_names", ["proto", "json"])
def test_files_in_protobufs_json_form_read_the_same(
    store: RouteStore, field_names: str
) -> None:
    """Files written by protobuf's JSON mapping (earlier releases, or by hand in either
    spelling) and ours are the same table, and ours parses back into the admin message."""
    text = json_format.MessageToJson(sample_message(),
                                     preserving_proto_field_name=field_names == "proto")
    store.path("m").write_text(text)
    assert store.read("m") == sample()
    store.write(sample())
    assert json_format.Parse(store.path("m").read_text(), admin.RouteTable()) == sample_message()


@pytest.mark.parametrize(("text", "expected"), [
    ('{"variants": {"name": "a"}}', "'variants' must be a list"),
    ('{"variants": [{"name": 3}]}', "variant 0 'name' must be a string"),
    ('{"variants": [{"name": "a", "weight": "x"}]}', "variant 0 'weight' must be a number"),
    ('{"shadow": {"target": {"name": "s"}, "max_pending": -1}}', "whole number"),
    ('{"canary": {"baseline": "a", "steps": 5}}', "'steps' must be a list"),
    ('[]', "table must be a JSON object"),
])
def test_malformed_fields_are_named(store: RouteStore, text: str, expected: str) -> None:
    store.path("m").write_text(text)
    with pytest.raises(InvalidInput, match=expected):
        store.read("m")


def test_no_file_reads_as_none(store: RouteStore) -> None:
    assert store.read("m") is None
    assert not store.changed("m")


def test_changed_detects_appearing_rewritten_and_vanishing_files(store: RouteStore) -> None:
    store.write(sample())
    assert not store.changed("m")  # our own write is not a change
    path = store.path("m")
    bump_mtime(path)
    assert store.changed("m")
    store.read("m")
    assert not store.changed("m")
    path.unlink()
    assert store.changed("m")
    assert store.read("m") is None
    assert not store.changed("m")
    path.write_text('{"variants": [{"name": "a", "weight": 1}]}')
    assert store.changed("m")
    assert store.read("m") == RouteTable(model="m", variants=(Variant(name="a", weight=1),))


def test_remove(store: RouteStore) -> None:
    store.write(sample())
    store.remove("m")
    assert not store.path("m").exists()
    assert not store.changed("m")
    store.remove("m")  # twice is fine


def test_a_file_is_read_once_even_when_rejected(store: RouteStore) -> None:
    path = store.path("m")
    path.write_text("{ not json")
    assert store.changed("m")
    with pytest.raises(InvalidInput, match=ROUTING_FILE):
        store.read("m")
    assert not store.changed("m")


def test_unknown_fields_and_another_models_table_are_rejected(store: RouteStore) -> None:
    store.path("m").write_text('{"variants": [], "weights": 3}')
    with pytest.raises(InvalidInput, match="weights"):
        store.read("m")
    store.path("m").write_text('{"model": "other"}')
    with pytest.raises(InvalidInput, match="names model 'other', not 'm'"):
        store.read("m")
