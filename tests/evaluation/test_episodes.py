"""few_shot_accuracy: hand-built episodes, an exact expectation by enumeration, groups."""

import itertools
import math

import numpy as np
import pytest

from kdml.evaluation import few_shot_accuracy


def _unit(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_hand_built_three_way_accuracy_is_two_thirds_in_every_episode():
    # class 2's two images are each nearer to class 0's images than to each other:
    # cos([1, .1, 0], [1, 0, 0]) = 0.995 > cos([1, .1, 0], [1, -.1, 0]) = 0.980.
    x = np.array([[1, 0, 0], [1, 0, 0], [0, 0, 1], [0, 0, 1], [1, .1, 0], [1, -.1, 0]])
    labels = np.array([0, 0, 1, 1, 2, 2])
    result = few_shot_accuracy(x, labels, n_way=3, k_shot=1, num_episodes=50, seed=3)
    assert result["episodes"] == 50
    assert result["accuracy"] == pytest.approx(2 / 3, abs=1e-12)
    assert result["ci95"] == pytest.approx(0.0, abs=1e-12)


def _enumerated_expectation(x, labels, n_way, k_shot, queries):
    """Exact expected episode accuracy: every class set and split equally likely."""
    x = _unit(x)
    classes = np.unique(labels)
    members = {c: np.flatnonzero(labels == c) for c in classes}
    expectations = []
    for chosen in itertools.combinations(classes, n_way):
        splits = []
        for c in chosen:
            options = []
            for support in itertools.combinations(members[c], k_shot):
                rest = [i for i in members[c] if i not in support]
                for query in itertools.combinations(rest, queries):
                    options.append((support, query))
            splits.append(options)
        accuracies = []
        for combo in itertools.product(*splits):
            prototypes = _unit([x[list(s)].mean(axis=0) for s, _ in combo])
            correct = total = 0
            for truth, (_, query) in enumerate(combo):
                for q in query:
                    correct += int(np.argmax(prototypes @ x[q]) == truth)
                    total += 1
            accuracies.append(correct / total)
        expectations.append(np.mean(accuracies))
    return float(np.mean(expectations))


@pytest.mark.parametrize("k_shot", [1, 2])
def test_mean_accuracy_matches_the_enumerated_expectation(k_shot):
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 3))
    labels = np.repeat(np.arange(4), 3)
    x = centres[labels] + 0.9 * rng.normal(size=(12, 3))
    expected = _enumerated_expectation(x, labels, n_way=2, k_shot=k_shot, queries=1)
    assert 0.55 < expected < 0.97  # the test is informative: neither chance nor perfect
    result = few_shot_accuracy(x, labels, n_way=2, k_shot=k_shot, queries_per_class=1,
                               num_episodes=4000, seed=1)
    standard_error = result["ci95"] / 1.96
    assert abs(result["accuracy"] - expected) < 4 * standard_error
    assert result["ci95"] > 0


def test_prototype_is_the_mean_of_normalised_exemplars():
    # class 0: a short exemplar at +70 degrees, a long one (norm 5) at -70 degrees and one
    # along e1; class 1: three copies of the direction -30 degrees. The three splits of
    # class 0 (which image is the query) are equally likely:
    #   query e1, prototype e1 (mean of the *normalised* +-70 rows): right, episode 1.0;
    #   query +70, prototype -35: nearer class 1 (cos 100 > cos 105): episode 0.5;
    #   query -70, prototype +35: nearer class 1 (cos 40): episode 0.5.
    # Expected 2/3. An unnormalised mean would lean to -61 degrees in the first split and
    # miss (cos 61 < cos 30): 1/2.
    a, b = np.deg2rad(70.0), np.deg2rad(30.0)
    class0 = [[np.cos(a), np.sin(a)], [5 * np.cos(a), -5 * np.sin(a)], [1.0, 0.0]]
    class1 = [[np.cos(b), -np.sin(b)]] * 3
    x = np.array(class0 + class1)
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert _enumerated_expectation(x, labels, n_way=2, k_shot=2, queries=1) == (
        pytest.approx(2 / 3))
    result = few_shot_accuracy(x, labels, n_way=2, k_shot=2, num_episodes=3000, seed=0)
    assert abs(result["accuracy"] - 2 / 3) < 4 * result["ci95"] / 1.96


def test_groups_restrict_each_episode_to_one_group():
    # classes 0 and 2 are identical; they sit in different groups, so a within-group
    # episode never has to tell them apart.
    base = _unit([[1, 0, 0, 0], [0, 1, 0, 0]])
    x = np.concatenate([np.repeat(base, 3, axis=0)] * 2)  # classes 0, 1, then 2 (= 0), 3 (= 1)
    labels = np.repeat(np.arange(4), 3)
    groups = np.array(["alpha"] * 6 + ["beta"] * 6)
    within = few_shot_accuracy(x, labels, n_way=2, num_episodes=200, groups=groups, seed=0)
    assert within["accuracy"] == 1.0
    mixed = few_shot_accuracy(x, labels, n_way=2, num_episodes=200, seed=0)
    assert mixed["accuracy"] < 0.95


def test_deterministic_by_seed():
    rng = np.random.default_rng(1)
    labels = np.repeat(np.arange(10), 4)
    x = rng.normal(size=(10, 8))[labels] + 1.5 * rng.normal(size=(40, 8))
    first = few_shot_accuracy(x, labels, n_way=5, num_episodes=300, seed=7)
    assert few_shot_accuracy(x, labels, n_way=5, num_episodes=300, seed=7) == first
    assert few_shot_accuracy(x, labels, n_way=5, num_episodes=300, seed=8) != first
    assert all(isinstance(first[key], float) for key in ("accuracy", "ci95"))
    assert isinstance(first["episodes"], int)
    assert math.isfinite(first["ci95"])


def test_errors_name_the_problem():
    x = np.eye(6)
    labels = np.array([0, 0, 1, 1, 2, 2])
    with pytest.raises(ValueError, match="at least n_way = 4 classes"):
        few_shot_accuracy(x, labels, n_way=4)
    with pytest.raises(ValueError, match="k_shot \\+ queries_per_class = 3"):
        few_shot_accuracy(x, labels, n_way=2, k_shot=2)
    with pytest.raises(ValueError, match="every group to have at least n_way = 2"):
        few_shot_accuracy(x, labels, n_way=2, groups=np.array([0, 0, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="share one group"):
        few_shot_accuracy(x, labels, n_way=2, groups=np.array([0, 1, 0, 0, 1, 1]))
    with pytest.raises(ValueError, match="n_way"):
        few_shot_accuracy(x, labels, n_way=1)
