"""server.routing.splitter: sticky keys by weighted rendezvous hashing, weighted random otherwise.

Tolerances: every share is checked within 5 standard deviations of a binomial count. The draws
are seeded and the keys fixed, so each test is deterministic; were they not, a 5-sigma bound
fails by chance with probability below 6e-7 per share (two-sided normal tail), under 1e-5 for
the whole file.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from server.routing.splitter import pick_sticky, pick_weighted

N = 20_000
SIGMAS = 5.0


def cumulative(weights: list[float]) -> list[float]:
    running, total = [], 0.0
    for weight in weights:
        total += weight
        running.append(total)
    return running


def assert_share(count: int, n: int, p: float) -> None:
    sigma = math.sqrt(n * p * (1 - p))
    assert abs(count - n * p) <= SIGMAS * max(sigma, 1.0), (
        f"{count} of {n} is {count / n:.4f}, expected {p:.4f} +- {SIGMAS * sigma / n:.4f}"
    )


def keys(n: int = N) -> list[str]:
    return [f"user-{i}" for i in range(n)]


def assignment(names: tuple[str, ...], weights: tuple[float, ...]) -> list[int]:
    return [pick_sticky(key, names, weights) for key in keys()]


def test_the_same_key_always_gets_the_same_variant() -> None:
    names, weights = ("a", "b", "c"), (50.0, 30.0, 20.0)
    for key in keys(500):
        first = pick_sticky(key, names, weights)
        assert all(pick_sticky(key, names, weights) == first for _ in range(3))


def test_a_key_follows_its_variant_name_not_its_position() -> None:
    forward = assignment(("a", "b"), (70.0, 30.0))
    backward = assignment(("b", "a"), (30.0, 70.0))
    assert [1 - i for i in backward] == forward


@pytest.mark.parametrize("weights", [(50.0, 50.0), (90.0, 10.0), (70.0, 20.0, 10.0),
                                     (1.0, 1.0, 1.0, 1.0)])
def test_weighted_random_split_matches_the_weights(weights: tuple[float, ...]) -> None:
    rng = random.Random(1234)
    running = cumulative(list(weights))
    counts = Counter(pick_weighted(running, rng) for _ in range(N))
    for index, weight in enumerate(weights):
        assert_share(counts[index], N, weight / sum(weights))


@pytest.mark.parametrize("weights", [(50.0, 50.0), (90.0, 10.0), (70.0, 20.0, 10.0)])
def test_many_sticky_keys_split_as_the_weights(weights: tuple[float, ...]) -> None:
    names = tuple(f"v{i}" for i in range(len(weights)))
    counts = Counter(assignment(names, weights))
    for index, weight in enumerate(weights):
        assert_share(counts[index], N, weight / sum(weights))


def moved(before: list[int], after: list[int]) -> list[tuple[int, int]]:
    return [(b, a) for b, a in zip(before, after, strict=True) if b != a]


def test_50_50_to_60_40_moves_about_a_tenth_of_the_keys_one_way() -> None:
    names = ("a", "b")
    changes = moved(assignment(names, (50.0, 50.0)), assignment(names, (60.0, 40.0)))
    share = len(changes) / N
    assert 0.05 < share < 0.15
    assert_share(len(changes), N, 0.10)
    # Only keys of the variant that lost weight move, and only to the one that gained it.
    assert set(changes) == {(1, 0)}


def test_90_10_to_80_20_moves_about_a_tenth_of_the_keys_and_no_more() -> None:
    names = ("stable", "new")
    changes = moved(assignment(names, (90.0, 10.0)), assignment(names, (80.0, 20.0)))
    assert_share(len(changes), N, 0.10)
    assert len(changes) / N < 0.12
    assert set(changes) == {(0, 1)}


def test_raising_one_of_three_weights_moves_keys_only_to_it() -> None:
    names = ("a", "b", "c")
    changes = moved(assignment(names, (40.0, 40.0, 20.0)), assignment(names, (40.0, 40.0, 30.0)))
    # c's share goes from 20 % to 30/110 = 27.3 %: the minimal move is 7.3 % of the keys.
    assert_share(len(changes), N, 30 / 110 - 0.2)
    assert {after for _, after in changes} == {2}


def test_unchanged_weights_move_no_key() -> None:
    names, weights = ("a", "b", "c"), (10.0, 60.0, 30.0)
    assert assignment(names, weights) == assignment(names, weights)


def test_a_zero_weight_variant_is_never_chosen() -> None:
    names, weights = ("a", "off", "c"), (30.0, 0.0, 70.0)
    assert 1 not in set(assignment(names, weights))
    rng = random.Random(7)
    for running in (cumulative([30.0, 0.0, 70.0]), cumulative([0.0, 100.0]),
                    cumulative([100.0, 0.0])):
        zero = [i for i in range(len(running)) if running[i] == (running[i - 1] if i else 0.0)]
        drawn = {pick_weighted(running, rng) for _ in range(5_000)}
        assert not drawn & set(zero)


def test_all_weights_zero_is_an_error_for_sticky_keys() -> None:
    with pytest.raises(ValueError, match="positive weight"):
        pick_sticky("k", ("a", "b"), (0.0, 0.0))
