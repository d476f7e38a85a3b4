"""kdml.benchmark.search: each row's default first, then distinct, reproducible draws seeded
by the row's name."""

import hashlib
import itertools

import numpy as np
import pytest

from kdml.benchmark.presets import PRESETS
from kdml.benchmark.protocol import BenchmarkSpec, MethodPreset, default_params, row_trials
from kdml.benchmark.search import row_seed, sample_trials

SPACE = {"crt_prototypes": (32, 64), "crt_temperature": (0.05, 0.1), "consistency_weight": (0.5, 1.0)}


def test_trials_are_distinct_grid_points_and_reproducible():
    trials = sample_trials(SPACE, 3, seed=0)
    grid = [dict(zip(sorted(SPACE), v)) for v in itertools.product(*(SPACE[k] for k in sorted(SPACE)))]
    assert len(trials) == 3 and all(t in grid for t in trials)
    assert len({tuple(sorted(t.items())) for t in trials}) == 3
    assert sample_trials(SPACE, 3, seed=0) == trials
    assert any(sample_trials(SPACE, 3, seed=s) != trials for s in range(1, 6))


def test_the_default_is_trial_zero_and_the_rest_is_drawn_from_the_other_points():
    default = {"consistency_weight": 1.0, "crt_prototypes": 64, "crt_temperature": 0.1}
    trials = sample_trials(SPACE, 3, seed=5, default=default)
    assert trials[0] == default and default not in trials[1:]
    rest = [p for p in (dict(zip(sorted(SPACE), v)) for v in
                        itertools.product(*(SPACE[k] for k in sorted(SPACE)))) if p != default]
    order = np.random.default_rng(5).permutation(len(rest))[:2]  # the draw, by hand
    assert trials[1:] == [rest[i] for i in order]
    with pytest.raises(ValueError, match="not a point of the grid"):
        sample_trials(SPACE, 2, default={**default, "crt_prototypes": 16})


def test_the_row_seed_is_a_stable_hash_of_the_row_name():
    expected = int.from_bytes(hashlib.sha256(b"0:proxy_nca").digest()[:8], "big")
    assert row_seed("proxy_nca") == expected
    assert row_seed("supcon") != row_seed("normalized_softmax")


def test_two_rows_with_equal_grid_sizes_get_different_draws():
    """Issue 30: one search seed for every row sampled every 3-value grid at the same
    positions; with the row's name in the seed they differ."""
    grid = {"ns_temperature": (0.02, 0.05, 0.1, 0.2, 0.5)}
    methods = {name: MethodPreset({"method": "normalized_softmax"}, grid)
               for name in ("row_a", "row_b", "row_c")}
    spec = BenchmarkSpec(budget={"data_kind": "glyph"}, methods=methods, trials=3)
    positions = {name: [grid["ns_temperature"].index(t["ns_temperature"])
                        for t in row_trials(spec, name)] for name in methods}
    assert all(p[0] == 1 for p in positions.values())  # the default 0.05 first
    assert len({tuple(p[1:]) for p in positions.values()}) > 1


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_every_grid_holds_its_default_and_tries_it_first(preset):
    spec = PRESETS[preset]
    for name, row in spec.methods.items():
        if not row.search:
            continue
        default = default_params(spec, name)
        for field, value in default.items():
            assert value in row.search[field], (name, field, value)
        assert row_trials(spec, name)[0] == default, name
        assert row.default_source, f"{name}: say where its default comes from"


def test_proxy_nca_tries_the_kdml_default_it_documents():
    from kdml.config import TrainConfig

    losses = PRESETS["omniglot_losses"]
    assert TrainConfig.proxy_nca_scale == 9.0  # ProxyNCA++'s T = 1/9
    assert row_trials(losses, "proxy_nca")[0] == {"proxy_nca_scale": 9.0}


def test_too_many_trials_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="num_trials=9.*Add candidate values"):
        sample_trials(SPACE, 9)
