"""kdml.benchmark.search: the same number of distinct, reproducible trials per method."""

import itertools

import pytest

from kdml.benchmark.search import sample_trials

SPACE = {"crt_prototypes": (32, 64), "crt_temperature": (0.05, 0.1), "consistency_weight": (0.5, 1.0)}


def test_trials_are_distinct_grid_points_and_reproducible():
    trials = sample_trials(SPACE, 3, seed=0)
    grid = [dict(zip(sorted(SPACE), v)) for v in itertools.product(*(SPACE[k] for k in sorted(SPACE)))]
    assert len(trials) == 3 and all(t in grid for t in trials)
    assert len({tuple(sorted(t.items())) for t in trials}) == 3
    assert sample_trials(SPACE, 3, seed=0) == trials
    assert any(sample_trials(SPACE, 3, seed=s) != trials for s in range(1, 6))


def test_a_grid_of_the_trial_count_is_searched_whole():
    assert sample_trials({"so_strength": (1.0, 10.0, 100.0)}, 3, seed=7) == [
        {"so_strength": 1.0}, {"so_strength": 10.0}, {"so_strength": 100.0}]


def test_too_many_trials_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="num_trials=9.*Add candidate values"):
        sample_trials(SPACE, 9)
