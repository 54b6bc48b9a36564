"""Deterministic planning: which values of the diversity grid item i gets, and its request seed.

The grid is the product of a generator's axes (template × topic × audience × style × ...; phi-1 §2.2 and
Cosmopedia get their diversity from exactly such constraints). Items walk the grid in an order shuffled by
the seed, so the first n items spread over every axis instead of varying only the last one, and once every
cell has been used a new shuffled pass starts. Nothing depends on time or on the order answers arrive in:
the same recipe plans the same items with the same per-item seeds, so it asks the same requests, and the
request cache answers a re-run without a single call. Raising `n` keeps the first items as they were.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass

_SHUFFLE_LIMIT = 1_000_000   # grids up to this size are shuffled in full; larger ones sampled without repeats


@dataclass(frozen=True)
class Item:
    """One planned item: its index, the request seed, and the grid cell (axis -> value index)."""

    index: int
    seed: int
    cell: tuple[tuple[str, int], ...]

    def value_index(self, axis: str) -> int:
        return dict(self.cell)[axis]


def derive_seed(*parts: object) -> int:
    """A stable 31-bit seed from any parts (sha256, not Python's salted `hash`)."""
    digest = hashlib.sha256(":".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


def _order(total: int, count: int, rng: random.Random) -> list[int]:
    """`count` distinct cell numbers in a seeded order; a longer `count` extends a shorter one's list."""
    if total <= _SHUFFLE_LIMIT:
        cells = list(range(total))
        rng.shuffle(cells)
        return cells[:count]
    seen: set[int] = set()
    out = []
    while len(out) < count:
        j = rng.randrange(total)
        if j not in seen:
            seen.add(j)
            out.append(j)
    return out


def plan(name: str, seed: int, axes: dict[str, int], n: int) -> list[Item]:
    """n items over the grid whose axis sizes are `axes` (in order). Item i's seed depends only on
    (seed, name, i)."""
    sizes = list(axes.values())
    total = math.prod(sizes)
    items: list[Item] = []
    passes = 0
    while len(items) < n:
        rng = random.Random(derive_seed("plan", seed, name, passes))
        for number in _order(total, min(total, n - len(items)), rng):
            cell = []
            for axis, size in reversed(list(axes.items())):
                number, k = divmod(number, size)
                cell.append((axis, k))
            i = len(items)
            items.append(Item(index=i, seed=derive_seed("item", seed, name, i), cell=tuple(reversed(cell))))
        passes += 1
    return items
