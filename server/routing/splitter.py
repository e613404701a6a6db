"""Choosing a variant: weighted rendezvous hashing for sticky keys, weighted random otherwise.

Rendezvous (highest-random-weight) hashing gives each (key, variant) pair a stable score and
picks the best; with weights, the score is -ln(u) / weight for a uniform u drawn from the hash.
A key keeps its variant while the weights stay the same, and changing one weight moves only
the keys that must move (about the change in that variant's share).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Sequence


def _uniform(key: str, variant: str) -> float:
    digest = hashlib.blake2b(f"{key}\x00{variant}".encode(), digest_size=8).digest()
    return (int.from_bytes(digest, "little") + 0.5) / 2**64


def pick_sticky(key: str, names: Sequence[str], weights: Sequence[float]) -> int:
    """Index of the variant ``key`` belongs to; variants of weight 0 are never chosen."""
    best = -1
    best_score = math.inf
    for index, (name, weight) in enumerate(zip(names, weights, strict=True)):
        if weight <= 0:
            continue
        score = -math.log(_uniform(key, name)) / weight
        if score < best_score:
            best, best_score = index, score
    if best < 0:
        raise ValueError("no variant has a positive weight")
    return best


def pick_weighted(cumulative: Sequence[float], rng: random.Random) -> int:
    """Index drawn in proportion to the weights, given their running sums."""
    point = rng.random() * cumulative[-1]
    for index, bound in enumerate(cumulative):
        if point < bound:
            return index
    return len(cumulative) - 1
