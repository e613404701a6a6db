"""Sweep specifications: ``1,8,32,64`` (a list), ``500:5000:500`` (start:stop:step, stop
included) or a mix of both (``1,2,4:16:4``). Values keep the order given; repeats are dropped.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

MAX_POINTS = 1000

Number = TypeVar("Number", int, float)


class SweepError(ValueError):
    """A sweep specification that cannot be parsed; the message names the bad part."""


def _number(text: str, kind: Callable[[str], Number], spec: str) -> Number:
    try:
        return kind(text.strip())
    except ValueError:
        noun = "an integer" if kind is int else "a number"
        raise SweepError(f"'{text.strip()}' in '{spec}' is not {noun}") from None


def _range(part: str, kind: Callable[[str], Number], spec: str) -> list[Number]:
    pieces = part.split(":")
    if len(pieces) not in (2, 3):
        raise SweepError(f"'{part}' in '{spec}': a range is start:stop or start:stop:step")
    start = _number(pieces[0], kind, spec)
    stop = _number(pieces[1], kind, spec)
    step = _number(pieces[2], kind, spec) if len(pieces) == 3 else kind("1")
    if step <= 0:
        raise SweepError(f"'{part}' in '{spec}': the step must be positive")
    if stop < start:
        raise SweepError(f"'{part}' in '{spec}': stop is below start")
    count = int((stop - start) / step + 1e-9) + 1
    if count > MAX_POINTS:
        raise SweepError(f"'{part}' in '{spec}' has {count} points; at most {MAX_POINTS}")
    # Multiply rather than accumulate, and round floats, so 0.1:0.3:0.1 ends at 0.3.
    return [kind(str(round(start + i * step, 9))) for i in range(count)]


def parse_sweep(spec: str, kind: Callable[[str], Number]) -> list[Number]:
    """Parse ``spec`` into positive values of ``kind`` (int or float)."""
    if not spec or not spec.strip():
        raise SweepError("empty sweep specification")
    values: list[Number] = []
    for part in spec.split(","):
        if not part.strip():
            raise SweepError(f"empty item in '{spec}'")
        if ":" in part:
            values.extend(_range(part, kind, spec))
        else:
            values.append(_number(part, kind, spec))
    for value in values:
        if value <= 0:
            raise SweepError(f"'{spec}': every value must be positive, got {value}")
    if len(values) > MAX_POINTS:
        raise SweepError(f"'{spec}' has {len(values)} points; at most {MAX_POINTS}")
    return list(dict.fromkeys(values))


def parse_concurrency(spec: str) -> list[int]:
    return parse_sweep(spec, int)


def parse_rate(spec: str) -> list[float]:
    return parse_sweep(spec, float)
