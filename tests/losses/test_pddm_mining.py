"""PDDM mining hardness (hardest / semihard / soft) against NumPy loops and a hand-worked
matrix, the soft draws' frequencies and seeding, the cosine warm-up, XLA, 2 replicas."""

import dataclasses
import json
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import PDDMScoreMatrix
from kdml.losses import PDDMLoss
from kdml.losses.pddm_loss import PDDMMiningSchedule, _gumbel, mine_quadruplets
from tests.helpers import assert_config_roundtrip, weights_after_one_step, write_glyph_folder
from tests.layers.test_pddm import _randomised_unit, pddm_reference, unit_weights
from tests.losses.test_pddm_loss import (_LABELS, _X, _Y, _build_model, _rows,
                                         all_pairs_reference)


def loop_mining(labels, scores, mode, hardness, noise=None, temperature=0.1):
    """Plain loops. Positive as the paper (lowest score; ties: first). Negatives:
    hardest: max S; semihard: max S among S < S_ij, else the hardest; soft: max of
    S / temperature + noise[0][q] (k) or noise[1][q] (l). Strict `>`: first index wins."""
    n = len(labels)
    negatives = lambda a: [k for k in range(n) if labels[k] != labels[a]]  # noqa: E731

    def best(row, candidates, key):
        out = None
        for k in candidates:
            if out is None or key(row, k) > key(row, out):
                out = k
        return out

    def negative(row, s_ij, q, side):
        hardest = best(row, negatives(row), lambda r, k: scores[r, k])
        if hardness == "hardest":
            return hardest
        if hardness == "semihard":
            below = [k for k in negatives(row) if scores[row, k] < s_ij]
            return best(row, below, lambda r, k: scores[r, k]) if below else hardest
        return best(row, negatives(row),
                    lambda r, k: np.float32(scores[r, k]) / np.float32(temperature)
                    + noise[side][q][k])

    pos = [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]
    if mode == "single":
        if not pos:
            return []
        i, j = pos[0]
        for p, q in pos:
            if scores[p, q] < scores[i, j]:
                i, j = p, q
        anchors = [(0, i, j)]
    else:
        anchors = []
        for i in range(n):
            js = [j for (a, j) in pos if a == i]
            if js:
                anchors.append((i, i, min(js, key=lambda q: (scores[i, q], q))))
    return [(i, j, negative(i, scores[i, j], q, 0), negative(j, scores[i, j], q, 1))
            for q, i, j in anchors if negatives(i)]


def _mined(labels, scores, mode, hardness, seed=None, temperature=0.1):
    i, j, k, l, valid = (t.numpy() for t in mine_quadruplets(
        tf.constant(labels, "int32"), tf.constant(scores, "float32"), mode, hardness,
        temperature, seed))
    return [tuple(int(x) for x in q) for q, ok in zip(zip(i, j, k, l), valid) if ok]


def _noise(labels, mode, seed):
    q = 1 if mode == "single" else len(labels)
    return _gumbel((2, q, len(labels)), tf.constant(seed, "int64")).numpy()


# Hand-made: labels 0 0 1 1 2 (anchor 4 has no positive). Ties: S_02 = S_01 (a negative
# level with the positive is not below it), S_12 = S_13 (hardest: the first), S_20 =
# S_21 (semihard: the first); anchor 3 has no negative below S_32 = .1 (fallback).
_HAND_LABELS = [0, 0, 1, 1, 2]
_HAND = np.array([[1.0, .5, .5, .2, .7],
                  [.6, 1.0, .9, .9, .1],
                  [.3, .3, 1.0, .4, .8],
                  [.95, .2, .1, 1.0, .99],
                  [.0, .0, .0, .0, 1.0]], "float32")


def test_hand_worked_matrix():
    # anchor 0: j = 1 (S_01 = .5); k: hardest 4 (.7); semihard < .5: {3 (.2)}, not 2 (= .5)
    #           l from row 1 (.9, .9, .1): hardest 2 (tie, first); semihard < .5: 4
    # anchor 1: j = 0 (.6); k: hardest 2 (tie .9, first); semihard < .6: 4 (.1)
    #           l from row 0 (.5, .2, .7): hardest 4; semihard < .6: 2 (.5)
    # anchor 2: j = 3 (.4); k: hardest 4 (.8); semihard < .4: 0 (.3, tie with 1: first)
    #           l from row 3 (.95, .2, .99): hardest 4; semihard < .4: 1 (.2)
    # anchor 3: j = 2 (.1); k: hardest 4 (.99); semihard: none < .1 -> hardest 4
    #           l from row 2 (.3, .3, .8): hardest 4; semihard: none < .1 -> 4
    hardest = [(0, 1, 4, 2), (1, 0, 2, 4), (2, 3, 4, 4), (3, 2, 4, 4)]
    semihard = [(0, 1, 3, 4), (1, 0, 4, 2), (2, 3, 0, 1), (3, 2, 4, 4)]
    assert _mined(_HAND_LABELS, _HAND, "per_anchor", "hardest") == hardest
    assert _mined(_HAND_LABELS, _HAND, "per_anchor", "semihard") == semihard
    # single: the lowest positive score is S_32 = .1 -> both rules fall back to (3, 2, 4, 4)
    for hardness in ("hardest", "semihard"):
        assert _mined(_HAND_LABELS, _HAND, "single", hardness) == [(3, 2, 4, 4)]
    for hardness in ("hardest", "semihard"):
        assert _mined(_HAND_LABELS, _HAND, "per_anchor", hardness) == loop_mining(
            _HAND_LABELS, _HAND, "per_anchor", hardness)


@pytest.mark.parametrize("hardness", ["hardest", "semihard", "soft"])
@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_every_rule_matches_the_loop(mode, hardness):
    # _LABELS plus one class only (no negative anywhere: no quadruplet).
    for case, labels in enumerate(_LABELS + [[4] * 8]):
        rng = np.random.default_rng(50 + case)
        # Coarse scores: ties are frequent (rows of 8 over 4 levels).
        scores = rng.integers(0, 4, size=(8, 8)).astype("float32") / 4
        seed = [7, case]
        noise = _noise(labels, mode, seed) if hardness == "soft" else None
        got = _mined(labels, scores, mode, hardness, tf.constant(seed), temperature=0.5)
        assert got == loop_mining(labels, scores, mode, hardness, noise, temperature=0.5)
        if case == len(_LABELS):
            assert got == []


def test_semihard_differs_from_hardest_and_keeps_the_ranking_where_it_can():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 4)
    scores = rng.normal(size=(16, 16)).astype("float32")
    hard = _mined(labels, scores, "per_anchor", "hardest")
    semi = _mined(labels, scores, "per_anchor", "semihard")
    assert sum(a != b for a, b in zip(hard, semi)) >= 4
    for i, j, k, l in semi:
        below = [c for c in range(16) if labels[c] != labels[i] and scores[i, c] < scores[i, j]]
        assert (scores[i, k] < scores[i, j]) == bool(below)


def test_soft_draws_follow_exp_score_over_temperature():
    """Class 0 (400 anchors) against 5 negatives scored v from every class-0 row: each
    call draws 400 k and 400 l, each P(k) = softmax(v / tau); 5 calls = 4000 draws."""
    v = np.array([0.3, 0.1, 0.1, -0.2, 0.5], "float32")  # a tie: equal frequencies
    tau = 0.2
    n = 400
    labels = np.array([0] * n + [1] * 5)
    scores = np.zeros((n + 5, n + 5), "float32")
    scores[:n, n:] = v
    expected = np.exp(v / tau) / np.exp(v / tau).sum()
    counts, same = np.zeros(5), 0
    for draw in range(5):
        i, j, k, l, valid = (t.numpy() for t in mine_quadruplets(
            tf.constant(labels, "int32"), scores, "per_anchor", "soft", tau,
            tf.constant([11, draw])))
        k, l = k[:n] - n, l[:n] - n
        assert valid[:n].all() and (k >= 0).all() and (l >= 0).all()
        counts += np.bincount(k, minlength=5) + np.bincount(l, minlength=5)
        same += int((k == l).sum())
    total = counts.sum()
    chi2 = float(((counts - total * expected) ** 2 / (total * expected)).sum())
    assert chi2 < 18.47, (counts, total * expected)  # chi-square, 4 dof, p = 0.001
    # k and l are independent draws: P(k = l) = sum p^2.
    np.testing.assert_allclose(same / (5 * n), (expected ** 2).sum(), atol=0.05)


def test_soft_draws_are_a_function_of_the_seed():
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 4)
    scores = rng.normal(size=(16, 16)).astype("float32")
    draw = lambda seed: _mined(labels, scores, "per_anchor", "soft", tf.constant(seed), 1.0)  # noqa: E731
    assert draw([1, 5]) == draw([1, 5])
    assert draw([1, 5]) != draw([1, 6]) and draw([1, 5]) != draw([2, 5])
    # tau -> 0 is the hardest rule (no ties here).
    assert _mined(labels, scores, "per_anchor", "soft", tf.constant([1, 5]), 1e-6) == _mined(
        labels, scores, "per_anchor", "hardest")
    with pytest.raises(ValueError, match="pass `seed`"):
        mine_quadruplets(tf.constant(labels), scores, hardness="soft")
    with pytest.raises(ValueError, match="hardness='hard'"):
        mine_quadruplets(tf.constant(labels), scores, hardness="hard")


# --- the loss ---------------------------------------------------------------------


def _reference_loss(labels, emb, scores, quads, alpha=0.5, beta=1.0, lambda_=0.5):
    """all_pairs E_m^all + lambda E_e averaged over the given quadruplets, float64."""
    d = lambda a, b: float(np.sum((emb[a] - emb[b]) ** 2))  # noqa: E731
    embedding = sum(max(0, beta + d(i, j) - d(i, k)) + max(0, beta + d(i, j) - d(j, l))
                    for i, j, k, l in quads)
    anchors = [e for e in all_pairs_reference(labels, scores, alpha) if e is not None]
    return sum(anchors) / len(anchors) + lambda_ * embedding / len(quads)


@pytest.mark.parametrize("hardness", ["semihard", "soft"])
def test_loss_trains_on_the_rule_s_quadruplets(hardness):
    for case, labels in enumerate(_LABELS):
        rng = np.random.default_rng(70 + case)
        unit = _randomised_unit(hidden_dim=6, dim=5, seed=case)
        emb = _rows(rng, 8, 5).astype("float32")
        loss = PDDMLoss(hardness=hardness, mining_temperature=0.3, seed=case)
        y_pred = PDDMScoreMatrix(unit)(emb)
        got = [float(loss(np.array(labels), y_pred)) for _ in range(2)]
        mined_on = y_pred.numpy()[:, 5:]  # the float32 scores the loss mined on
        scores = pddm_reference(unit_weights(unit), emb[:, None].astype("float64"),
                                emb[None].astype("float64"))
        for draw in range(2):
            noise = _noise(labels, "per_anchor", [case, draw]) if hardness == "soft" else None
            quads = loop_mining(labels, mined_on, "per_anchor", hardness, noise, 0.3)
            np.testing.assert_allclose(
                got[draw], _reference_loss(labels, emb.astype("float64"), scores, quads), rtol=1e-5)
        assert int(loss.draws.numpy()) == (2 if hardness == "soft" else 0)


def test_warmup_variable_switches_mining_to_cosine_inside_a_compiled_step():
    unit = _randomised_unit(hidden_dim=6, dim=5, seed=1)
    emb = _rows(np.random.default_rng(4), 8, 5).astype("float32")
    labels = np.array(_LABELS[2])
    y_pred = PDDMScoreMatrix(unit)(emb)
    by_unit = float(PDDMLoss()(labels, y_pred))
    by_cosine = float(PDDMLoss(mining_score="cosine")(labels, y_pred))
    assert abs(by_unit - by_cosine) > 1e-3
    loss = PDDMLoss()
    step = tf.function(lambda y: loss(labels, y), jit_compile=True)
    assert float(step(y_pred)) == pytest.approx(by_unit, rel=1e-6)
    loss.mine_by_unit.assign(False)  # what PDDMMiningSchedule does; no retrace needed
    assert float(step(y_pred)) == pytest.approx(by_cosine, rel=1e-6)
    assert step.experimental_get_tracing_count() == 1


def test_schedule_switches_at_the_warmup_epoch_and_carries_its_state():
    loss = PDDMLoss(hardness="soft")
    schedule = PDDMMiningSchedule(loss, warmup_epochs=2)
    modes = []
    for epoch in range(4):
        schedule.on_epoch_begin(epoch)
        logs = {}
        schedule.on_epoch_end(epoch, logs)
        modes.append(logs["pddm_mine_by_unit"])
    assert modes == [0.0, 0.0, 1.0, 1.0]
    loss.draws.assign(17)
    schedule.on_epoch_begin(1)
    state = json.loads(json.dumps(schedule.checkpoint_state()))
    assert state == {"pddm_mine_by_unit": False, "pddm_draws": 17}
    fresh = PDDMLoss(hardness="soft")
    PDDMMiningSchedule(fresh, 2).restore_checkpoint_state(state)
    assert not bool(fresh.mine_by_unit.numpy()) and int(fresh.draws.numpy()) == 17
    with pytest.raises(ValueError, match="--pddm_mining_warmup_epochs=-1"):
        PDDMMiningSchedule(loss, -1)
    with pytest.raises(ValueError, match="needs --pddm_mining_score=unit"):
        PDDMMiningSchedule(PDDMLoss(mining_score="cosine"), 2)


@pytest.mark.parametrize("hardness", ["semihard", "soft"])
def test_xla_compiled_loss_and_gradient_equal_eager(hardness):
    unit = _randomised_unit()
    emb = tf.Variable(_rows(np.random.default_rng(5), 8, 5).astype("float32"))
    labels = tf.constant(_LABELS[2])

    def value_and_grads(loss, e):
        with tf.GradientTape() as tape:
            value = loss(labels, PDDMScoreMatrix(unit)(e))
        return value, tape.gradient(value, [e] + unit.trainable_weights)

    make = lambda: PDDMLoss(hardness=hardness, mining_temperature=0.2, seed=4)  # noqa: E731
    eager_value, eager_grads = value_and_grads(make(), emb)
    xla_value, xla_grads = tf.function(value_and_grads, jit_compile=True)(make(), emb)
    np.testing.assert_allclose(xla_value.numpy(), eager_value.numpy(), rtol=1e-5)
    for x, e in zip(xla_grads, eager_grads):
        np.testing.assert_allclose(x.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("hardness,by_unit", [("semihard", True), ("soft", True),
                                              ("hardest", False)])
def test_mirrored_step_equals_single_device_step(mirrored, hardness, by_unit):
    initial = _build_model().get_weights()

    def make():
        loss = PDDMLoss(hardness=hardness, mining_temperature=0.5, alpha=2.0, beta=2.0, seed=9)
        loss.mine_by_unit.assign(by_unit)
        return loss

    single = weights_after_one_step(tf.distribute.get_strategy(), _build_model, initial, make(),
                                    _X, _Y)
    with mirrored.scope():
        loss = make()
    gathered = weights_after_one_step(mirrored, _build_model, initial, loss, _X, _Y)
    assert max(np.abs(ws - w0).max() for w0, ws in zip(initial, single)) > 1e-3
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)
    # One draw per step, counted once for both replicas.
    assert int(loss.draws.numpy()) == (1 if hardness == "soft" else 0)


def test_config_roundtrip_and_bad_arguments():
    loss = PDDMLoss(hardness="soft", mining_temperature=0.25, seed=5, mining="single")
    clone = assert_config_roundtrip(loss)
    assert (clone.hardness, clone.mining_temperature, clone.seed, clone.mining) == (
        "soft", 0.25, 5, "single")
    assert PDDMLoss().hardness == "hardest"  # the paper's stays the default
    with pytest.raises(ValueError, match="hardness='semi'"):
        PDDMLoss(hardness="semi")
    with pytest.raises(ValueError, match="mining_temperature=0"):
        PDDMLoss(mining_temperature=0)
    with pytest.raises(ValueError, match="seed=1.5"):
        PDDMLoss(seed=1.5)


def test_method_table_passes_the_hardness_temperature_seed_and_warmup(tmp_path):
    from kdml.config import TrainConfig
    from kdml.methods import get_method
    from kdml.models import build_embedder

    config = TrainConfig(method="pddm", output_dir=str(tmp_path), seed=3,
                         pddm_hardness="soft", pddm_mining_temperature=0.5,
                         pddm_mining_warmup_epochs=2).resolved("glyph")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    objective = get_method("pddm").build(embedder, 3, config)
    loss = objective.loss
    assert (loss.hardness, loss.mining_temperature, loss.seed) == ("soft", 0.5, 3)
    (schedule,) = [c for c in objective.callbacks if isinstance(c, PDDMMiningSchedule)]
    assert schedule.loss is loss and schedule.warmup_epochs == 2
    with pytest.raises(ValueError, match="--pddm_mining_temperature"):
        get_method("pddm").build(embedder, 3, dataclasses.replace(
            config, pddm_mining_temperature=-1.0))
    with pytest.raises(ValueError, match="--pddm_hardness must be one of"):
        TrainConfig(pddm_hardness="hard")


@pytest.fixture(scope="module")
def glyph_folder(tmp_path_factory):
    return write_glyph_folder(tmp_path_factory.mktemp("glyph_folder"),
                              class_dir=lambda label: f"alphabet{label // 6}/char{label:02d}")


@pytest.mark.slow
def test_warmup_and_soft_draws_survive_a_resume(glyph_folder, tmp_path):
    """Stopped after epoch 1 of a 2-epoch warm-up, resumed to 3 epochs: epoch 2 still
    mines by cosine, epoch 3 by the unit, and the draws' counter continues."""
    from kdml.training import train
    from tests.training.test_train import _config

    config = _config(glyph_folder, tmp_path, method="pddm", epochs=1, pddm_hardness="soft",
                     pddm_mining_warmup_epochs=2, embedding_dim=8, pddm_hidden_dim=8)
    train(config)
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"))
    with open(tmp_path / "checkpoints" / checkpoints[-1] / "state.json") as f:
        state = json.load(f)
    steps = state["step"]
    assert state["pddm_mine_by_unit"] is False and state["pddm_draws"] == steps
    history = train(dataclasses.replace(config, epochs=3, resume=True))
    modes = [history["epochs"][str(e)]["pddm_mine_by_unit"] for e in (1, 2, 3)]
    assert modes == [0.0, 0.0, 1.0]
    checkpoints = sorted(os.listdir(tmp_path / "checkpoints"), key=lambda n: int(n.split("-")[1]))
    with open(tmp_path / "checkpoints" / checkpoints[-1] / "state.json") as f:
        state = json.load(f)
    assert state["pddm_mine_by_unit"] is True and state["pddm_draws"] == 3 * steps
