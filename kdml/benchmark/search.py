"""Hyperparameter trials: a seeded sample of a method's own grid, the same count per method."""

from __future__ import annotations

import itertools
from typing import Dict, List, Mapping, Sequence

import numpy as np


def grid_size(space: Mapping[str, Sequence]) -> int:
    """Points of the grid `space` (1 for an empty space: the row's fixed configuration)."""
    return int(np.prod([len(v) for v in space.values()], dtype=np.int64)) if space else 1


def sample_trials(space: Mapping[str, Sequence], num_trials: int, seed: int = 0) -> List[Dict]:
    """`num_trials` distinct points of the grid `space`, drawn without replacement.

    Args:
        space: `{TrainConfig field: candidate values}`; the grid is their product.
        num_trials: points to draw; at most the grid size.
        seed: seed of the draw (`numpy.random.default_rng`); the result is a pure
            function of `space`, `num_trials` and `seed`.

    Returns:
        A list of `{field: value}` dicts, in draw order (the whole grid, in grid order,
        when `num_trials` equals its size).
    """
    names = sorted(space)
    grid = [dict(zip(names, values)) for values in itertools.product(*(space[n] for n in names))]
    if not 0 < num_trials <= len(grid):
        raise ValueError(
            f"Expected `num_trials` in [1, {len(grid)}] for a grid of {len(grid)} points over "
            f"{names}. Received: num_trials={num_trials}. Add candidate values to the method's "
            "search space or lower the number of trials.")
    if num_trials == len(grid):
        return grid
    order = np.random.default_rng(seed).permutation(len(grid))[:num_trials]
    return [grid[i] for i in order]
