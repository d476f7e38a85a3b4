"""Hyperparameter trials: a row's default first, then a seeded sample of the rest of its grid.

Trial 0 of every row is its documented default (the paper's value, or
pytorch-metric-learning's where kdml follows it; `MethodPreset.defaults`). The other
trials are drawn without replacement from the rest of the grid with a seed derived from
the row's name (`row_seed`: a stable hash, not Python's salted `hash()`), so two rows
whose grids have the same size are not sampled at the same positions.
"""

from __future__ import annotations

import hashlib
import itertools
from typing import Dict, List, Mapping, Optional, Sequence

import numpy as np


def grid_size(space: Mapping[str, Sequence]) -> int:
    """Points of the grid `space` (1 for an empty space: the row's fixed configuration)."""
    return int(np.prod([len(v) for v in space.values()], dtype=np.int64)) if space else 1


def row_seed(name: str, seed: int = 0) -> int:
    """A seed of the draw for row `name`: the first 8 bytes of sha256("<seed>:<name>").

    The same on every machine and Python process (unlike `hash(name)`), different for
    different rows.
    """
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "big")


def grid_points(space: Mapping[str, Sequence]) -> List[Dict]:
    """Every point of `space` as `{field: value}`, in grid order (fields sorted by name)."""
    names = sorted(space)
    return [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]


def sample_trials(space: Mapping[str, Sequence], num_trials: int, seed: int = 0,
                  default: Optional[Mapping] = None) -> List[Dict]:
    """`num_trials` distinct points of the grid `space`, the default first.

    Args:
        space: `{TrainConfig field: candidate values}`; the grid is their product.
        num_trials: points to draw; at most the grid size.
        seed: seed of the draw (`numpy.random.default_rng`; `row_seed(row)` in the
            benchmark); the result is a pure function of the arguments.
        default: the row's default point (`{field: value}` for every field of `space`,
            each value one of its candidates), or None. When given, it is trial 0 and the
            other trials are drawn from the rest of the grid.

    Returns:
        A list of `{field: value}` dicts: the default (if any), then the draw, in draw
        order.
    """
    grid = grid_points(space)
    if not 0 < num_trials <= len(grid):
        raise ValueError(
            f"Expected `num_trials` in [1, {len(grid)}] for a grid of {len(grid)} points over "
            f"{sorted(space)}. Received: num_trials={num_trials}. Add candidate values to the "
            "method's search space or lower the number of trials.")
    first: List[Dict] = []
    if default is not None:
        point = {k: default.get(k) for k in sorted(space)}
        if point not in grid:
            raise ValueError(
                f"The default {point} is not a point of the grid {dict(space)}. Add each "
                "default value to its field's candidates.")
        first = [point]
        grid = [p for p in grid if p != point]
    order = np.random.default_rng(seed).permutation(len(grid))[:num_trials - len(first)]
    return first + [grid[i] for i in order]
