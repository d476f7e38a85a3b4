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


def reference_loss(labels, emb, scores, mode, alpha=0.5, beta=1.0, lambda_=0.5,
                   mining_scores=None):
    """Eq. (3)-(5) averaged over the brute-force quadruplets (mined on `mining_scores`,
    default the unit's `scores`), float64."""
    quads = brute_force_mining(labels, scores if mining_scores is None else mining_scores, mode)
    if not quads:
        return 0.0
    total = 0.0
    for i, j, k, l in quads:
        d = lambda a, b: float(np.sum((emb[a] - emb[b]) ** 2))  # noqa: E731
        total += max(0, alpha - scores[i, j] + scores[i, k]) + max(0, alpha - scores[i, j] + scores[j, l])
        total += lambda_ * (max(0, beta + d(i, j) - d(i, k)) + max(0, beta + d(i, j) - d(j, l)))
    return total / len(quads)


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


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_loss_matches_reference_with_a_real_unit(mode):
    for seed, labels in enumerate(_LABELS):
        rng = np.random.default_rng(10 + seed)
        unit = _randomised_unit(hidden_dim=6, dim=5, seed=seed)
        emb = _rows(rng, 8, 5).astype("float32")
        y_pred = PDDMScoreMatrix(unit)(emb)
        for kwargs in [{}, dict(alpha=2.0, beta=0.3, lambda_=2.0)]:
            got = float(PDDMLoss(mining=mode, **kwargs)(np.array(labels), y_pred))
            scores = pddm_reference(unit_weights(unit), emb[:, None].astype("float64"),
                                    emb[None].astype("float64"))
            expected = reference_loss(labels, emb.astype("float64"), scores, mode, **kwargs)
            assert expected > 0
            np.testing.assert_allclose(got, expected, rtol=1e-5)


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_cosine_mining_ablation_mines_by_cosine_and_keeps_the_hinges_on_the_unit(mode):
    differs = 0
    for seed, labels in enumerate(_LABELS):
        rng = np.random.default_rng(30 + seed)
        unit = _randomised_unit(hidden_dim=6, dim=5, seed=seed)
        emb = _rows(rng, 8, 5).astype("float32")
        y_pred = PDDMScoreMatrix(unit)(emb)
        scores = pddm_reference(unit_weights(unit), emb[:, None].astype("float64"),
                                emb[None].astype("float64"))
        cosine = emb.astype("float64") @ emb.T.astype("float64")
        got = float(PDDMLoss(mining=mode, mining_score="cosine")(np.array(labels), y_pred))
        expected = reference_loss(labels, emb.astype("float64"), scores, mode,
                                  mining_scores=cosine)
        np.testing.assert_allclose(got, expected, rtol=1e-5)
        differs += brute_force_mining(labels, cosine, mode) != brute_force_mining(labels, scores, mode)
    assert differs >= 2  # the switch changes which quadruplets train


def test_hand_worked_example():
    # cosine as a stand-in score: S01 = .6, S02 = .8, S12 = .96; D = 2 - 2 S.
    # single: (i, j, k, l) = (0, 1, 2, 2): E_m = .7 + .86, E_e = 1.4 + 1.72 -> 1.56 + 1.56.
    # per_anchor: anchor 1 gives (1, 0, 2, 2), the same terms; anchor 2 has no positive.
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], "float32")
    y_pred = np.concatenate([emb, emb @ emb.T], axis=1)
    for mode in ("single", "per_anchor"):
        np.testing.assert_allclose(float(PDDMLoss(mining=mode)([0, 0, 1], y_pred)), 3.12, rtol=1e-6)


def _numpy_loss_of_everything(unit_w, emb, labels, mode):
    scores = pddm_reference(unit_w, emb[:, None], emb[None])
    return reference_loss(labels, emb, scores, mode, alpha=2.0, beta=1.5)


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_gradients_reach_unit_and_embeddings_and_match_finite_differences(mode):
    rng = np.random.default_rng(21)
    labels = np.array([0, 0, 1, 1, 2, 2])
    unit = _randomised_unit(hidden_dim=4, dim=3, seed=3)
    emb = tf.Variable(_rows(rng, 6, 3).astype("float32"))
    loss = PDDMLoss(mining=mode, alpha=2.0, beta=1.5)
    with tf.GradientTape() as tape:
        value = loss(labels, PDDMScoreMatrix(unit)(emb))
    grads = tape.gradient(value, [emb] + unit.trainable_weights)
    weights = unit_weights(unit)
    base = emb.numpy().astype("float64")
    np.testing.assert_allclose(float(value), _numpy_loss_of_everything(weights, base, labels, mode),
                               rtol=1e-5)
    h = 1e-6
    # Embeddings (the embedder's side).
    numeric = numerical_gradient(
        lambda e: _numpy_loss_of_everything(weights, e, labels, mode), base, h)
    assert np.abs(numeric).max() > 0.05
    np.testing.assert_allclose(grads[0].numpy(), numeric, rtol=2e-3, atol=2e-4)
    # Every weight of the unit.
    for variable, grad in zip(unit.trainable_weights, grads[1:]):
        name = variable.path.split("/", 1)[1]
        numeric = numerical_gradient(
            lambda w: _numpy_loss_of_everything({**weights, name: w}, base, labels, mode),
            weights[name], h)
        if name == "score_dense/kernel":
            assert np.abs(numeric).max() > 0.05
        if name == "score_dense/bias":  # S_ik - S_ij: the score offset cancels
            assert np.all(grad.numpy() == 0.0)
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=2e-3, atol=2e-4, err_msg=name)


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


@pytest.mark.parametrize("mode", ["per_anchor", "single"])
def test_xla_compiled_loss_and_gradient_equal_eager(mode):
    unit = _randomised_unit()
    emb = tf.Variable(_rows(np.random.default_rng(5), 8, 5).astype("float32"))
    labels = tf.constant(_LABELS[2])
    loss = PDDMLoss(mining=mode)

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
    with pytest.raises(ValueError, match="mining_score='l2'"):
        PDDMLoss(mining_score="l2")
    with pytest.raises(ValueError, match="alpha=-1"):
        PDDMLoss(alpha=-1)
    with pytest.raises(ValueError, match="gather_across_replicas=False"):
        PDDMLoss(gather_across_replicas=False)
    with pytest.raises(ValueError, match="PDDMScoreMatrix"):
        PDDMLoss()(np.array([0, 0, 1]), np.zeros((3, 3), "float32"))


def test_method_table_passes_the_mining_score_and_unit_normalization(tmp_path):
    import dataclasses

    from kdml.config import TrainConfig
    from kdml.methods import get_method
    from kdml.models import build_embedder

    config = TrainConfig(method="pddm", output_dir=str(tmp_path)).resolved("glyph")
    embedder = build_embedder("conv4", embedding_dim=8, image_size=16)
    default = get_method("pddm").build(embedder, 3, config)
    assert default.loss.mining_score == "unit"
    assert default.model.get_layer("pddm_scores").unit.normalization == "before_fc"
    ablation = get_method("pddm").build(embedder, 3, dataclasses.replace(
        config, pddm_mining_score="cosine", pddm_normalization="after_fc"))
    assert ablation.loss.mining_score == "cosine"
    assert ablation.model.get_layer("pddm_scores").unit.normalization == "after_fc"


def test_config_roundtrip_keeps_every_argument():
    loss = PDDMLoss(alpha=0.7, beta=0.2, lambda_=0.0, mining="single", mining_score="cosine",
                    name="p")
    clone = assert_config_roundtrip(loss)
    assert (clone.alpha, clone.beta, clone.lambda_, clone.mining, clone.mining_score,
            clone.name) == (0.7, 0.2, 0.0, "single", "cosine", "p")


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
    assert min(moved[:-1]) > 1e-3 and moved[-1] == 0.0
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
