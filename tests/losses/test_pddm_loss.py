"""PDDMLoss: mining against brute-force loops, loss against a NumPy reference, finite
differences through the unit and the embeddings, empty batches, and 2 replicas."""

import logging

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import PDDM, PDDMScoreMatrix
from kdml.losses import PDDMLoss
from kdml.losses.pddm_loss import PDDMMiningMonitor, mine_quadruplets
from tests.helpers import assert_config_roundtrip, numerical_gradient, weights_after_one_step
from tests.layers.test_pddm import _randomised_unit, pddm_reference, unit_weights


def brute_force_mining(labels, scores, mode):
    """Loops over the batch; strict comparisons keep the first (lowest-index) extremum."""
    n = len(labels)
    pos = [(i, j) for i in range(n) for j in range(n) if i != j and labels[i] == labels[j]]

    def hardest_negative(a):
        best = None
        for k in range(n):
            if labels[k] != labels[a] and (best is None or scores[a, k] > scores[a, best]):
                best = k
        return best

    quads = []
    if mode == "single":
        if pos:
            i, j = pos[0]
            for p, q in pos:
                if scores[p, q] < scores[i, j]:
                    i, j = p, q
            if hardest_negative(i) is not None:
                quads.append((i, j, hardest_negative(i), hardest_negative(j)))
        return quads
    for i in range(n):
        js = [j for (a, j) in pos if a == i]
        if not js or hardest_negative(i) is None:
            continue
        j = js[0]
        for q in js:
            if scores[i, q] < scores[i, j]:
                j = q
        quads.append((i, j, hardest_negative(i), hardest_negative(j)))
    return quads


def all_pairs_reference(labels, scores, alpha):
    """E_m^all per anchor by loops: 2 x the mean hinge over its (positive, negative) pairs;
    None for an anchor without both."""
    n = len(labels)
    out = []
    for i in range(n):
        hinges = [max(0.0, alpha - scores[i, j] + scores[i, k])
                  for j in range(n) if j != i and labels[j] == labels[i]
                  for k in range(n) if labels[k] != labels[i]]
        out.append(2.0 * sum(hinges) / len(hinges) if hinges else None)
    return out


def reference_loss(labels, emb, scores, mode, alpha=0.5, beta=1.0, lambda_=0.5,
                   mining_scores=None, unit_loss="all_pairs"):
    """Eq. (3)-(5) on the brute-force quadruplets (mined on `mining_scores`, default the
    unit's `scores`), float64. unit_loss="hardest": E_m + lambda E_e averaged over the
    quadruplets; "all_pairs": E_m^all averaged over anchors + lambda E_e averaged over
    the quadruplets."""
    quads = brute_force_mining(labels, scores if mining_scores is None else mining_scores, mode)
    if not quads:
        return 0.0
    d = lambda a, b: float(np.sum((emb[a] - emb[b]) ** 2))  # noqa: E731
    unit_total, embedding_total = 0.0, 0.0
    for i, j, k, l in quads:
        unit_total += max(0, alpha - scores[i, j] + scores[i, k]) + max(0, alpha - scores[i, j] + scores[j, l])
        embedding_total += max(0, beta + d(i, j) - d(i, k)) + max(0, beta + d(i, j) - d(j, l))
    if unit_loss == "hardest":
        return (unit_total + lambda_ * embedding_total) / len(quads)
    anchors = [e for e in all_pairs_reference(labels, scores, alpha) if e is not None]
    return sum(anchors) / len(anchors) + lambda_ * embedding_total / len(quads)


def _rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return x / np.linalg.norm(x, axis=1, keepdims=True)


_LABELS = [
    [0, 0, 1, 1, 2, 2, 3, 3],
    [0, 0, 0, 1, 1, 1, 1, 5],  # a singleton class
    [3, 1, 3, 1, 3, 1, 7, 7],
    [0, 1, 2, 3, 4, 5, 6, 6],  # one positive pair only
]


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
@pytest.mark.parametrize("seed", range(4))
def test_mining_matches_brute_force(mode, seed):
    rng = np.random.default_rng(seed)
    labels = np.array(_LABELS[seed])
    scores = rng.normal(size=(8, 8)).astype("float32")  # not symmetric: any S works
    i, j, k, l, valid = (t.numpy() for t in mine_quadruplets(tf.constant(labels, "int32"), scores, mode))
    got = [q for q, ok in zip(zip(i, j, k, l), valid) if ok]
    assert got == brute_force_mining(labels, scores, mode)


@pytest.mark.parametrize("unit_loss", ["all_pairs", "hardest"])
@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_loss_matches_reference_with_a_real_unit(mode, unit_loss):
    for seed, labels in enumerate(_LABELS):
        rng = np.random.default_rng(10 + seed)
        unit = _randomised_unit(hidden_dim=6, dim=5, seed=seed)
        emb = _rows(rng, 8, 5).astype("float32")
        y_pred = PDDMScoreMatrix(unit)(emb)
        for kwargs in [{}, dict(alpha=2.0, beta=0.3, lambda_=2.0)]:
            got = float(PDDMLoss(mining=mode, unit_loss=unit_loss, **kwargs)(np.array(labels),
                                                                              y_pred))
            scores = pddm_reference(unit_weights(unit), emb[:, None].astype("float64"),
                                    emb[None].astype("float64"))
            expected = reference_loss(labels, emb.astype("float64"), scores, mode,
                                      unit_loss=unit_loss, **kwargs)
            assert expected > 0
            np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("unit_loss", ["all_pairs", "hardest"])
@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_cosine_mining_ablation_mines_by_cosine_and_keeps_the_hinges_on_the_unit(mode, unit_loss):
    differs = 0
    for seed, labels in enumerate(_LABELS):
        rng = np.random.default_rng(30 + seed)
        unit = _randomised_unit(hidden_dim=6, dim=5, seed=seed)
        emb = _rows(rng, 8, 5).astype("float32")
        y_pred = PDDMScoreMatrix(unit)(emb)
        scores = pddm_reference(unit_weights(unit), emb[:, None].astype("float64"),
                                emb[None].astype("float64"))
        cosine = emb.astype("float64") @ emb.T.astype("float64")
        got = float(PDDMLoss(mining=mode, mining_score="cosine",
                             unit_loss=unit_loss)(np.array(labels), y_pred))
        expected = reference_loss(labels, emb.astype("float64"), scores, mode,
                                  mining_scores=cosine, unit_loss=unit_loss)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        differs += brute_force_mining(labels, cosine, mode) != brute_force_mining(labels, scores, mode)
    assert differs >= 2  # the switch changes which quadruplets train


def test_hand_worked_example():
    # cosine as a stand-in score: S01 = .6, S02 = .8, S12 = .96; D = 2 - 2 S.
    # single: (i, j, k, l) = (0, 1, 2, 2): E_m = .7 + .86, E_e = 1.4 + 1.72 -> 1.56 + 1.56.
    # per_anchor: anchor 1 gives (1, 0, 2, 2), the same terms; anchor 2 has no positive.
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], "float32")
    y_pred = np.concatenate([emb, emb @ emb.T], axis=1)
    # all_pairs: anchor 0 has one (positive, negative) pair, 2 x .7; anchor 1, 2 x .86;
    # their mean 1.56 equals the mined E_m here.
    for mode in ("single", "per_anchor"):
        for unit_loss in ("hardest", "all_pairs"):
            got = float(PDDMLoss(mining=mode, unit_loss=unit_loss)([0, 0, 1], y_pred))
            np.testing.assert_allclose(got, 3.12, rtol=1e-6)
    # Two positives and two negatives per anchor: the mean differs from the hardest pair.
    # Scores (symmetric): S01 = .9, S23 = .8, S02 = .1, S03 = .7, S12 = .3, S13 = .2;
    # anchor 0 (P {1}, N {2, 3}): hinges [.5 - .9 + .1]+ = 0, [.5 - .9 + .7]+ = .3 -> 2 x .15
    # anchor 1: [.5 - .9 + .3]+ = 0, [.5 - .9 + .2]+ = 0 -> 0
    # anchor 2 (P {3}, N {0, 1}): [.5 - .8 + .1]+ = 0, [.5 - .8 + .3]+ = 0 -> 0
    # anchor 3: [.5 - .8 + .7]+ = .4, [.5 - .8 + .2]+ = 0 -> 2 x .2
    # E_m^all = (.3 + 0 + 0 + .4) / 4 = .175 (lambda = 0 keeps the embedding hinge out).
    s = np.array([[1, .9, .1, .7], [.9, 1, .3, .2], [.1, .3, 1, .8], [.7, .2, .8, 1]], "float32")
    y_pred = np.concatenate([np.eye(4, dtype="float32"), s], axis=1)
    np.testing.assert_allclose(
        float(PDDMLoss(lambda_=0.0)([0, 0, 1, 1], y_pred)), 0.175, rtol=1e-6)
    # alpha = 1, by hand:
    # all_pairs: anchor 0: .2, .8 -> 1.0; 1: .4, .3 -> .7; 2: .3, .5 -> .8; 3: .9, .4 -> 1.3
    #   -> (1.0 + .7 + .8 + 1.3) / 4 = .95
    # hardest: anchor 0: (0,1,k=3,l=2): .8 + .4 = 1.2; 1: (1,0,k=2,l=3): .4 + .8 = 1.2;
    #   2: (2,3,k=1,l=0): .5 + .9 = 1.4; 3: (3,2,k=0,l=1): .9 + .5 = 1.4 -> 1.3
    np.testing.assert_allclose(
        float(PDDMLoss(alpha=1.0, lambda_=0.0)([0, 0, 1, 1], y_pred)), 0.95, rtol=1e-6)
    np.testing.assert_allclose(float(PDDMLoss(alpha=1.0, lambda_=0.0, unit_loss="hardest")(
        [0, 0, 1, 1], y_pred)), 1.3, rtol=1e-6)


def _numpy_loss_of_everything(unit_w, emb, labels, mode, unit_loss):
    scores = pddm_reference(unit_w, emb[:, None], emb[None])
    return reference_loss(labels, emb, scores, mode, alpha=2.0, beta=1.5, unit_loss=unit_loss)


@pytest.mark.parametrize("unit_loss", ["all_pairs", "hardest"])
@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_gradients_reach_unit_and_embeddings_and_match_finite_differences(mode, unit_loss):
    rng = np.random.default_rng(21)
    labels = np.array([0, 0, 1, 1, 2, 2])
    unit = _randomised_unit(hidden_dim=4, dim=3, seed=3)
    emb = tf.Variable(_rows(rng, 6, 3).astype("float32"))
    loss = PDDMLoss(mining=mode, alpha=2.0, beta=1.5, unit_loss=unit_loss)
    with tf.GradientTape() as tape:
        value = loss(labels, PDDMScoreMatrix(unit)(emb))
    grads = tape.gradient(value, [emb] + unit.trainable_weights)
    weights = unit_weights(unit)
    base = emb.numpy().astype("float64")
    np.testing.assert_allclose(
        float(value), _numpy_loss_of_everything(weights, base, labels, mode, unit_loss), rtol=1e-5)
    h = 1e-6
    # Embeddings (the embedder's side).
    numeric = numerical_gradient(
        lambda e: _numpy_loss_of_everything(weights, e, labels, mode, unit_loss), base, h)
    assert np.abs(numeric).max() > 0.05
    np.testing.assert_allclose(grads[0].numpy(), numeric, rtol=2e-3, atol=2e-4)
    # Every weight of the unit.
    for variable, grad in zip(unit.trainable_weights, grads[1:]):
        name = variable.path.split("/", 1)[1]
        numeric = numerical_gradient(
            lambda w: _numpy_loss_of_everything({**weights, name: w}, base, labels, mode,
                                                unit_loss),
            weights[name], h)
        if name == "score_dense/kernel":
            assert np.abs(numeric).max() > 0.05
        if name == "score_dense/bias":  # S_ik - S_ij: the score offset cancels (to rounding)
            assert np.all(np.abs(grad.numpy()) < 1e-6)
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=2e-3, atol=2e-4, err_msg=name)


def _train_unit_alone(unit_loss, steps=150):
    """The unit alone on fixed embeddings (lambda = 0): 8 classes in 6-d, noisy unit rows,
    4 images per class per step, Adam 1e-2. Returns (last loss, ROC AUC of unseen
    positive vs negative pairs' scores, the scores' standard deviation)."""
    rng = np.random.default_rng(0)
    centres = _rows(rng, 8, 6)

    def sample(n_per_class):
        emb = np.repeat(centres, n_per_class, axis=0) + 0.25 * rng.normal(size=(8 * n_per_class, 6))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        return emb.astype("float32"), np.repeat(np.arange(8), n_per_class)

    keras.utils.set_random_seed(1)
    unit = PDDM(hidden_dim=32)
    head = PDDMScoreMatrix(unit)
    loss = PDDMLoss(alpha=0.5, lambda_=0.0, unit_loss=unit_loss)
    optimizer = keras.optimizers.Adam(1e-2)
    for _ in range(steps):
        emb, labels = sample(4)
        with tf.GradientTape() as tape:
            value = loss(labels, head(emb))
        optimizer.apply_gradients(zip(tape.gradient(value, unit.trainable_weights),
                                      unit.trainable_weights))
    emb, labels = sample(6)
    scores = unit.pairwise(emb).numpy()
    off = ~np.eye(len(labels), dtype=bool)
    same = labels[:, None] == labels[None, :]
    pos, neg = scores[same & off], scores[~same]
    return float(value), float((pos[:, None] > neg[None, :]).mean()), float(scores[off].std())


def test_hardest_unit_loss_collapses_the_unit_and_all_pairs_trains_it():
    """The mined hinge's minimum is a constant score: each of its hinges is
    [alpha - min_pos S + max_neg S]_+ >= alpha unless S separates the batch, = alpha for a
    constant, so the loss goes to 2 alpha and the scores' spread to ~0. The all-pairs
    hinge has no such minimum: the same unit learns to rank unseen positives first."""
    loss, auc, spread = _train_unit_alone("hardest")
    assert abs(loss - 2 * 0.5) < 0.01 and spread < 0.01, (loss, auc, spread)
    loss, auc, spread = _train_unit_alone("all_pairs")
    assert loss < 0.5 and auc > 0.85 and spread > 0.3, (loss, auc, spread)


@pytest.mark.parametrize("labels", [np.zeros(6, "int32"), np.arange(6)], ids=["no_negative", "no_positive"])
def test_batch_without_quadruplet_is_zero_with_finite_gradients_and_a_warning(labels, caplog):
    unit = _randomised_unit(hidden_dim=4, dim=3)
    emb = tf.Variable(_rows(np.random.default_rng(0), 6, 3).astype("float32"))
    loss = PDDMLoss()
    with pytest.warns(RuntimeWarning, match="no positive pair or no negative"):
        with tf.GradientTape() as tape:
            value = loss(labels, PDDMScoreMatrix(unit)(emb))
    grads = tape.gradient(value, [emb] + unit.trainable_weights)
    assert float(value) == 0.0
    assert all(np.all(g.numpy() == 0.0) for g in grads if g is not None)
    assert int(loss.invalid_batches.numpy()) == 1

    # Inside a compiled step: no Python warning, but the counter and the monitor's log.
    monitor = PDDMMiningMonitor(loss)
    monitor.on_train_begin()
    step = tf.function(lambda e: loss(labels, PDDMScoreMatrix(unit)(e)))
    assert float(step(emb)) == 0.0 and float(step(emb)) == 0.0
    logs = {}
    with caplog.at_level(logging.WARNING):
        monitor.on_epoch_end(0, logs)
    assert logs["pddm_invalid_batches"] == 2.0
    assert "2 batch(es) gave zero loss" in caplog.text


@pytest.mark.parametrize("unit_loss", ["all_pairs", "hardest"])
@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_xla_compiled_loss_and_gradient_equal_eager(mode, unit_loss):
    unit = _randomised_unit()
    emb = tf.Variable(_rows(np.random.default_rng(5), 8, 5).astype("float32"))
    labels = tf.constant(_LABELS[2])
    loss = PDDMLoss(mining=mode, unit_loss=unit_loss)

    def value_and_grads(e):
        with tf.GradientTape() as tape:
            value = loss(labels, PDDMScoreMatrix(unit)(e))
        return value, tape.gradient(value, [e] + unit.trainable_weights)

    eager_value, eager_grads = value_and_grads(emb)
    xla_value, xla_grads = tf.function(value_and_grads, jit_compile=True)(emb)
    np.testing.assert_allclose(xla_value.numpy(), eager_value.numpy(), rtol=1e-5)
    for x, e in zip(xla_grads, eager_grads):
        np.testing.assert_allclose(x.numpy(), e.numpy(), rtol=1e-4, atol=1e-6)


def test_low_precision_input_gives_float32_loss():
    unit = _randomised_unit()
    emb = _rows(np.random.default_rng(3), 8, 5).astype("float32")
    y_pred = PDDMScoreMatrix(unit)(emb)
    loss = PDDMLoss()
    low = tf.cast(y_pred, "bfloat16")
    got = loss(np.array(_LABELS[0]), low)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), loss(np.array(_LABELS[0]), tf.cast(low, "float32")).numpy())


def test_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="mining='hardest'"):
        PDDMLoss(mining="hardest")
    with pytest.raises(ValueError, match="unit_loss='mined'"):
        PDDMLoss(unit_loss="mined")
    with pytest.raises(ValueError, match="mining_score='l2'"):
        PDDMLoss(mining_score="l2")
    with pytest.raises(ValueError, match="alpha=-1"):
        PDDMLoss(alpha=-1)
    with pytest.raises(ValueError, match="gather_across_replicas=False"):
        PDDMLoss(gather_across_replicas=False)
    with pytest.raises(ValueError, match="PDDMScoreMatrix"):
        PDDMLoss()(np.array([0, 0, 1]), np.zeros((3, 3), "float32"))


def test_method_table_passes_the_mining_score_unit_loss_and_unit_normalization(tmp_path):
    import dataclasses

    from kdml.config import TrainConfig
    from kdml.methods import get_method
    from kdml.models import build_embedder

    config = TrainConfig(method="pddm", output_dir=str(tmp_path)).resolved("glyph")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    default = get_method("pddm").build(embedder, 3, config)
    assert default.loss.mining_score == "unit"
    assert default.loss.unit_loss == "all_pairs"
    assert default.model.get_layer("pddm_scores").unit.normalization == "before_fc"
    ablation = get_method("pddm").build(embedder, 3, dataclasses.replace(
        config, pddm_mining_score="cosine", pddm_normalization="after_fc",
        pddm_unit_loss="hardest"))
    assert ablation.loss.mining_score == "cosine" and ablation.loss.unit_loss == "hardest"
    assert ablation.model.get_layer("pddm_scores").unit.normalization == "after_fc"


def test_config_roundtrip_keeps_every_argument():
    loss = PDDMLoss(alpha=0.7, beta=0.2, lambda_=0.0, mining="single", mining_score="cosine",
                    unit_loss="hardest", name="p")
    clone = assert_config_roundtrip(loss)
    assert (clone.alpha, clone.beta, clone.lambda_, clone.mining, clone.mining_score,
            clone.unit_loss, clone.name) == (0.7, 0.2, 0.0, "single", "cosine", "hardest", "p")


# --- training model and distribution ----------------------------------------------

_X = np.random.default_rng(12).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 2, 0, 1])  # replica 1's 0 and 1 have positives only globally


def _build_model():
    inputs = keras.Input(shape=(4,))
    emb = keras.ops.normalize(keras.layers.Dense(3, name="embed")(inputs), axis=-1)
    return keras.Model(inputs, PDDMScoreMatrix(PDDM(16, name="pddm"))(emb))


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_mirrored_step_equals_single_device_step_on_the_global_batch(mirrored, mode):
    initial = _build_model().get_weights()
    make = lambda: PDDMLoss(mining=mode, alpha=2.0, beta=2.0)  # noqa: E731  (every hinge active)
    single = weights_after_one_step(tf.distribute.get_strategy(), _build_model, initial, make(), _X, _Y)
    with mirrored.scope():
        loss = make()
    gathered = weights_after_one_step(mirrored, _build_model, initial, loss, _X, _Y)
    moved = [np.abs(ws - w0).max() for w0, ws in zip(initial, single)]
    # The embedder and every weight of the unit but the score offset b_s (it cancels
    # in S_ik - S_ij) were trained.
    assert min(moved[:-1]) > 1e-3 and moved[-1] < 1e-7
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)


def test_mirrored_loss_value_equals_single_device_loss(mirrored):
    model = _build_model()
    loss = PDDMLoss()
    expected = float(loss(_Y, model(_X)))
    with mirrored.scope():
        replica_loss = PDDMLoss()

    def replica_fn(x, y):
        return replica_loss(y, model(x))

    data = mirrored.experimental_distribute_dataset(tf.data.Dataset.from_tensors((_X, _Y)))
    x, y = next(iter(data))
    total = mirrored.reduce("SUM", mirrored.run(replica_fn, args=(x, y)), axis=None)
    np.testing.assert_allclose(float(total), expected, rtol=1e-6)
