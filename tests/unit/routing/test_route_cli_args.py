"""server.cli.route: the flags of `peregrine route set` into a RouteTable, and status text."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
from google.protobuf import json_format

from server._pb import admin_pb2 as admin
from server.cli import build_parser
from server.cli.route import UsageError, build_table, format_status, parse_shadow, parse_variant


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["route", *argv])


def test_variant_forms() -> None:
    assert parse_variant("a=2:90") == admin.Variant(name="a", version="2", weight=90)
    assert parse_variant("b=other:3:10.5") == admin.Variant(name="b", model="other",
                                                            version="3", weight=10.5)
    assert parse_variant("c=:1") == admin.Variant(name="c", version="", weight=1)


@pytest.mark.parametrize("bad", ["a", "a=2", "=2:5", "a=1:2:3:4", "a=2:lots"])
def test_bad_variants(bad: str) -> None:
    with pytest.raises(UsageError, match=r"--variant|weight"):
        parse_variant(bad)


def test_shadow_forms() -> None:
    assert parse_shadow("s=3") == (admin.Variant(name="s", version="3"), 0.0)
    assert parse_shadow("s=3:0.25") == (admin.Variant(name="s", version="3"), 0.25)
    assert parse_shadow("s=:0.5") == (admin.Variant(name="s"), 0.5)
    assert parse_shadow("s=twin:2") == (admin.Variant(name="s", model="twin", version="2"), 0)
    assert parse_shadow("s=twin:2:0.1") == (admin.Variant(name="s", model="twin",
                                                          version="2"), 0.1)
    with pytest.raises(UsageError):
        parse_shadow("s")


def test_full_set_command_line() -> None:
    args = parse("--user", "ops", "set", "m", "--variant", "a=1:90", "--variant", "b=2:10",
                 "--shadow", "s=3:0.5", "--shadow-max-pending", "8",
                 "--shadow-max-pending-bytes", "1048576", "--canary", "a:b",
                 "--steps", "5,50,100", "--step-interval", "30", "--max-p99-ratio", "2",
                 "--max-error-rate-increase", "0.05", "--min-requests", "7",
                 "--sticky-parameter", "user", "--url", "127.0.0.1:9")
    assert (args.url, args.user, args.timeout) == ("127.0.0.1:9", "ops", 30.0)
    table = build_table(args)
    assert table == admin.RouteTable(
        model="m",
        variants=[admin.Variant(name="a", version="1", weight=90),
                  admin.Variant(name="b", version="2", weight=10)],
        shadow=admin.Shadow(target=admin.Variant(name="s", version="3"), fraction=0.5,
                            max_pending=8, max_pending_bytes=1048576),
        canary=admin.Canary(baseline="a", candidate="b", steps=[5, 50, 100],
                            step_interval_secs=30, max_p99_ratio=2,
                            max_error_rate_increase=0.05, min_requests=7),
        sticky_parameter="user",
    )


def test_file_is_the_base_and_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    base = admin.RouteTable(model="m", variants=[admin.Variant(name="a", version="1", weight=1)],
                            sticky_parameter="user")
    path.write_text(json_format.MessageToJson(base))
    assert build_table(parse("set", "m", "--file", str(path))) == base
    table = build_table(parse("set", "m", "--file", str(path), "--variant", "z=2:5"))
    assert [v.name for v in table.variants] == ["z"] and table.sticky_parameter == "user"
    with pytest.raises(UsageError, match="table of 'm', not of 'n'"):
        build_table(parse("set", "n", "--file", str(path)))
    path.write_text(json.dumps({"model": "m", "bogus": 1}))
    with pytest.raises(UsageError, match="bogus"):
        build_table(parse("set", "m", "--file", str(path)))


@pytest.mark.parametrize(("argv", "message"), [
    (("set", "m"), "no variants"),
    (("set", "m", "--variant", "a=1:1", "--steps", "1,2"), "need --canary"),
    (("set", "m", "--variant", "a=1:1", "--canary", "ab"), "BASELINE:CANDIDATE"),
    (("set", "m", "--variant", "a=1:1", "--canary", "a:b", "--steps", "1,x"), "--steps"),
    (("set", "m", "--variant", "a=1:1", "--shadow-max-pending", "3"), "needs --shadow"),
])
def test_usage_errors(argv: tuple[str, ...], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        build_table(parse(*argv))


def test_status_text() -> None:
    status = admin.RouteStatus(
        table=admin.RouteTable(
            model="m", variants=[admin.Variant(name="a", version="1", weight=90),
                                 admin.Variant(name="b", model="twin", weight=10)],
            shadow=admin.Shadow(target=admin.Variant(name="s", version="3")),
            canary=admin.Canary(baseline="a", candidate="b", steps=[10, 100]),
        ),
        variants=[admin.VariantStatus(name="a", model="m", version="1", weight=90,
                                      requests=900, errors=2, p99_ms=1.5),
                  admin.VariantStatus(name="b", model="twin", weight=10, requests=100)],
        shadow=admin.ShadowStatus(mirrored=10, dropped=1, compared=9, agreement=1.0),
        canary_state="running", canary_step=0, canary_reason="waiting",
    )
    text = format_status(status)
    assert "model m" in text
    rows = {line.split()[0]: line.split() for line in text.splitlines()[2:4]}
    assert rows["a"] == ["a", "m:1", "90", "900", "2", "1.50"]
    assert rows["b"] == ["b", "twin:latest", "10", "100", "0", "0.00"]
    assert ("shadow s -> m:3 (fraction 1, max pending 256 copies, 64 MiB): mirrored 10, "
            "dropped 1") in text
    assert "agreement 1.0000" in text
    assert "canary running: a -> b, step 1 of [10,100]" in text
    assert "reason: waiting" in text
    assert "WARNING" not in text
    status.persist_error = "not persisted (read-only): in force in memory only"
    assert format_status(status).splitlines()[-1] == \
        "  WARNING: routing file not persisted (read-only): in force in memory only"
