"""PDDM unit: NumPy reference of Eq. (1) in both normalisation orders, scale invariance,
finite gradients for identical inputs, symmetry, pairwise == per-pair, float32, dropout,
serialization, and the score-matrix head under MirroredStrategy."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import PDDM, PDDMScoreMatrix
from kdml.layers.pddm import pddm_pair_model
from tests.helpers import assert_config_roundtrip, assert_model_save_load


def unit_weights(unit):
    """{name: float64 array} of a built PDDM unit."""
    return {w.path.split("/", 1)[1]: np.asarray(w.numpy(), "float64") for w in unit.weights}


def pddm_reference(weights, a, b, normalization="before_fc"):
    """Huang et al. 2016 Eq. (1) on row pairs, float64, straight from the formulas:
    u1, v1 L2-normalised before their fully connected layers ("after_fc": after)."""
    def l2n(x):
        return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-6)

    def fc(x, name):
        return np.maximum(x @ weights[f"{name}/kernel"] + weights[f"{name}/bias"], 0)

    w = weights
    u1 = np.abs(a - b)
    v1 = (a + b) / 2
    if normalization == "before_fc":
        u, v = fc(l2n(u1), "u_dense"), fc(l2n(v1), "v_dense")
    else:
        u, v = l2n(fc(u1, "u_dense")), l2n(fc(v1, "v_dense"))
    c = np.maximum(np.concatenate([u, v], -1) @ w["c_dense/kernel"] + w["c_dense/bias"], 0)
    return (c @ w["score_dense/kernel"] + w["score_dense/bias"])[..., 0]


def _randomised_unit(hidden_dim=6, dim=5, seed=0, **kwargs):
    """A built unit with non-zero biases (Keras initialises them to 0)."""
    unit = PDDM(hidden_dim, **kwargs)
    unit.build((None, dim))
    rng = np.random.default_rng(seed)
    for w in unit.weights:
        w.assign(rng.normal(scale=0.7, size=w.shape).astype("float32"))
    return unit


def _rows(rng, n, d):
    x = rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


@pytest.mark.parametrize("normalization", ["before_fc", "after_fc"])
def test_scores_match_numpy_reference(normalization):
    rng = np.random.default_rng(1)
    unit = _randomised_unit(normalization=normalization)
    a, b = _rows(rng, 7, 5), _rows(rng, 7, 5)
    got = unit(a, b).numpy()
    assert got.shape == (7,) and got.dtype == np.float32
    expected = pddm_reference(unit_weights(unit), a.astype("float64"), b.astype("float64"),
                              normalization)
    assert np.std(expected) > 0.05
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    pairwise = unit.pairwise(a, b).numpy()
    np.testing.assert_allclose(
        pairwise, pddm_reference(unit_weights(unit), a[:, None].astype("float64"),
                                 b[None].astype("float64"), normalization), rtol=1e-5, atol=1e-5)
    assert unit.normalization == normalization


def test_paper_order_ignores_the_scale_of_the_pair_and_the_other_order_does_not():
    """u2 = u1/||u1||, v2 = v1/||v1||: scaling both embeddings leaves S unchanged."""
    rng = np.random.default_rng(11)
    a, b = _rows(rng, 6, 5), _rows(rng, 6, 5)
    paper, other = _randomised_unit(), _randomised_unit(normalization="after_fc")
    np.testing.assert_allclose(paper(3.0 * a, 3.0 * b).numpy(), paper(a, b).numpy(),
                               rtol=1e-5, atol=1e-5)
    assert np.abs(other(3.0 * a, 3.0 * b).numpy() - other(a, b).numpy()).max() > 1e-2


@pytest.mark.parametrize("normalization", ["before_fc", "after_fc"])
def test_identical_inputs_have_finite_scores_and_gradients(normalization):
    """u1 = |f - f| = 0 on the diagonal of a score matrix: the norm guard keeps it finite."""
    unit = _randomised_unit(normalization=normalization)
    x = tf.Variable(_rows(np.random.default_rng(12), 4, 5))
    with tf.GradientTape() as tape:
        scores = unit.pairwise(x)
        diagonal = tf.reduce_sum(tf.linalg.diag_part(scores)) + tf.reduce_sum(unit(x, x))
    grads = tape.gradient(diagonal, [x] + unit.trainable_weights)
    assert all(np.all(np.isfinite(g.numpy())) for g in grads)
    # u2 = 0, v2 = f: the reference with u1 = 0 (its 1e-6 guard gives 0 / 1e-6 = 0 too).
    expected = pddm_reference(unit_weights(unit), x.numpy().astype("float64"),
                              x.numpy().astype("float64"), normalization)
    np.testing.assert_allclose(np.diag(scores.numpy()), expected, rtol=1e-5, atol=1e-5)


def test_symmetric_in_its_inputs_exactly():
    rng = np.random.default_rng(2)
    unit = _randomised_unit()
    a, b = _rows(rng, 9, 5), _rows(rng, 9, 5)
    np.testing.assert_array_equal(unit(a, b).numpy(), unit(b, a).numpy())
    matrix = unit.pairwise(a).numpy()
    np.testing.assert_array_equal(matrix, matrix.T)


def test_pairwise_equals_per_pair_calls():
    rng = np.random.default_rng(3)
    unit = _randomised_unit()
    x, y = _rows(rng, 6, 5), _rows(rng, 4, 5)
    rows, cols = np.meshgrid(np.arange(6), np.arange(6), indexing="ij")
    per_pair = unit(x[rows.ravel()], x[cols.ravel()]).numpy().reshape(6, 6)
    np.testing.assert_allclose(unit.pairwise(x).numpy(), per_pair, rtol=1e-6, atol=1e-6)
    rows, cols = np.meshgrid(np.arange(6), np.arange(4), indexing="ij")
    per_pair = unit(x[rows.ravel()], y[cols.ravel()]).numpy().reshape(6, 4)
    cross = unit.pairwise(x, y).numpy()
    assert cross.shape == (6, 4)
    np.testing.assert_allclose(cross, per_pair, rtol=1e-6, atol=1e-6)


def test_float32_scores_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    unit = _randomised_unit(hidden_dim=8, dim=6)
    x = tf.cast(_rows(np.random.default_rng(4), 5, 6), "bfloat16")
    scores = unit(x, x[::-1])
    assert scores.dtype == tf.float32 and all(w.dtype == "float32" for w in unit.weights)
    # against Eq. (1) in float64 on the bfloat16-rounded inputs, not against the unit itself;
    # the FC layers compute in bfloat16 (3 significant digits), hence the tolerance
    rows = x.numpy().astype("float64")
    expected = pddm_reference(unit_weights(unit), rows, rows[::-1])
    np.testing.assert_allclose(scores.numpy(), expected, rtol=2e-2, atol=2e-2)
    assert np.corrcoef(scores.numpy(), expected)[0, 1] > 0.999
    assert unit.pairwise(x).dtype == tf.float32


def test_dropout_only_in_training():
    unit = _randomised_unit(hidden_dim=32, dropout=0.5)
    x = _rows(np.random.default_rng(5), 6, 5)
    inference = unit(x, x[::-1], training=False).numpy()
    np.testing.assert_allclose(unit(x, x[::-1]).numpy(), inference)
    assert np.abs(unit(x, x[::-1], training=True).numpy() - inference).max() > 1e-3


def test_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="hidden_dim=0"):
        PDDM(0)
    with pytest.raises(ValueError, match="dropout=1.0"):
        PDDM(4, dropout=1.0)
    with pytest.raises(ValueError, match="normalization='inputs'"):
        PDDM(4, normalization="inputs")
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        PDDM(4).pairwise(np.zeros((2, 3, 4), "float32"))
    with pytest.raises(ValueError, match="kdml.layers.PDDM"):
        PDDMScoreMatrix(keras.layers.Dense(3))


def test_config_roundtrip_and_keras_files():
    unit = _randomised_unit(hidden_dim=6, dropout=0.25, normalization="after_fc", name="pddm")
    clone = assert_config_roundtrip(unit)
    assert (clone.hidden_dim, clone.dropout, clone.normalization) == (6, 0.25, "after_fc")
    old_config = {k: v for k, v in PDDM(6).get_config().items() if k != "normalization"}
    assert PDDM.from_config(old_config).normalization == "after_fc"  # saved before the option
    x = _rows(np.random.default_rng(6), 4, 5)
    loaded = assert_model_save_load(pddm_pair_model(unit, 5), [x, x[::-1]])
    np.testing.assert_allclose(loaded([x, x[::-1]]).numpy(), unit(x, x[::-1]).numpy(), atol=1e-6)

    inputs = keras.Input((5,))
    head = PDDMScoreMatrix(unit, name="pddm_scores")
    assert_config_roundtrip(head)
    assert_model_save_load(keras.Model(inputs, head(inputs)), x)


def test_score_matrix_head_is_embeddings_then_pairwise_scores():
    unit = _randomised_unit()
    x = _rows(np.random.default_rng(7), 6, 5)
    out = PDDMScoreMatrix(unit)(x).numpy()
    assert out.shape == (6, 5 + 6)
    np.testing.assert_array_equal(out[:, :5], x)
    np.testing.assert_allclose(out[:, 5:], unit.pairwise(x).numpy(), atol=1e-6)


def test_score_matrix_head_scores_local_rows_against_the_global_batch(mirrored):
    with mirrored.scope():
        unit = _randomised_unit()
        head = PDDMScoreMatrix(unit)
    x = _rows(np.random.default_rng(8), 8, 5)
    per_replica = mirrored.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[4 * ctx.replica_id_in_sync_group: 4 * ctx.replica_id_in_sync_group + 4]))
    outputs = mirrored.experimental_local_results(mirrored.run(head, args=(per_replica,)))
    full = np.concatenate([o.numpy() for o in outputs], axis=0)
    assert full.shape == (8, 5 + 8)
    np.testing.assert_allclose(full[:, 5:], unit.pairwise(x).numpy(), atol=1e-6)
