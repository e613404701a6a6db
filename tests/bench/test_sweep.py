"""Sweep specifications: lists, ranges, and the errors for bad ones."""

from __future__ import annotations

import pytest

from bench.loadgen.sweep import MAX_POINTS, SweepError, parse_concurrency, parse_rate


@pytest.mark.parametrize(("spec", "expected"), [
    ("1", [1]),
    ("1,8,32", [1, 8, 32]),
    ("1, 8 ,32,64", [1, 8, 32, 64]),
    ("8:32:8", [8, 16, 24, 32]),
    ("1:4", [1, 2, 3, 4]),
    ("1,2,4:16:4", [1, 2, 4, 8, 12, 16]),
    ("8,1,8", [8, 1]),  # order kept, repeats dropped
    ("5:12:5", [5, 10]),  # stop need not be on the grid
])
def test_concurrency(spec: str, expected: list[int]) -> None:
    assert parse_concurrency(spec) == expected


def test_rate_range_includes_stop() -> None:
    rates = parse_rate("500:5000:500")
    assert rates == [500.0 * k for k in range(1, 11)]
    assert all(isinstance(rate, float) for rate in rates)


def test_fractional_rate_range_does_not_drift() -> None:
    assert parse_rate("0.1:0.3:0.1") == [0.1, 0.2, 0.3]
    assert parse_rate("2.5,10") == [2.5, 10.0]


@pytest.mark.parametrize(("spec", "message"), [
    ("", "empty"),
    ("  ", "empty"),
    ("1,,8", "empty item"),
    ("a", "not an integer"),
    ("1.5", "not an integer"),
    ("0", "positive"),
    ("-4", "positive"),
    ("8:1", "stop is below start"),
    ("1:8:0", "step must be positive"),
    ("1:8:-1", "step must be positive"),
    ("1:2:3:4", "start:stop"),
    ("1:x", "not an integer"),
    (f"1:{MAX_POINTS + 1}", "at most"),
])
def test_bad_concurrency(spec: str, message: str) -> None:
    with pytest.raises(SweepError, match=message):
        parse_concurrency(spec)


def test_bad_rate() -> None:
    with pytest.raises(SweepError, match="not a number"):
        parse_rate("fast")
    with pytest.raises(SweepError, match="positive"):
        parse_rate("0:100:50")


def test_cli_reports_a_bad_sweep(capsys: pytest.CaptureFixture[str]) -> None:
    from bench.loadgen.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["run", "--model", "m", "--concurrency", "8:1"])
    assert exit_info.value.code == 2
    assert "stop is below start" in capsys.readouterr().err
