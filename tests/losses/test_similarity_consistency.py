"""SimilarityConsistency and MultiBranchLoss against NumPy references, gradients,
and one MirroredStrategy step on 2 logical CPUs vs one device on the global batch."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.losses import (MultiBranchLoss, MultiSimilarityLoss, ProxyAnchorLoss,
                         SimilarityConsistency)
from tests.helpers import numerical_gradient, weights_after_one_step


def consistency_reference(e1, e2):
    e1, e2 = np.asarray(e1, np.float64), np.asarray(e2, np.float64)
    b = len(e1)
    return sum((e1[i] @ e1[j] - e2[i] @ e2[j]) ** 2 for i in range(b) for j in range(b)) / b ** 2


def _unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype("float32")


def test_zero_for_identical_branches_and_for_isometric_ones():
    rng = np.random.default_rng(0)
    e = _unit_rows(rng, (6, 4))
    loss = SimilarityConsistency()
    assert float(loss(None, (e, e))) == 0.0
    # A rotated copy, in another dimension, has the same similarity matrix.
    rotation, _ = np.linalg.qr(rng.normal(size=(7, 7)))
    padded = np.concatenate([e, np.zeros((6, 3), "float32")], axis=1) @ rotation
    np.testing.assert_allclose(float(loss(None, (e, padded.astype("float32")))), 0.0, atol=1e-12)


def test_matches_numpy_reference_as_pair_and_as_split_tensor():
    rng = np.random.default_rng(1)
    e1, e2 = _unit_rows(rng, (5, 4)), _unit_rows(rng, (5, 3))
    expected = consistency_reference(e1, e2)
    assert expected > 1e-2
    np.testing.assert_allclose(float(SimilarityConsistency()(None, (e1, e2))), expected, rtol=1e-5)
    packed = np.concatenate([e1, e2], axis=1)
    np.testing.assert_allclose(float(SimilarityConsistency(split=4)(np.zeros(5), packed)),
                               expected, rtol=1e-5)


def test_gradient_matches_finite_differences_and_reaches_both_branches():
    rng = np.random.default_rng(2)
    e1, e2 = rng.normal(size=(4, 3)), rng.normal(size=(4, 2))
    a, b = tf.Variable(e1, dtype="float32"), tf.Variable(e2, dtype="float32")
    with tf.GradientTape() as tape:
        value = SimilarityConsistency()(None, (a, b))
    ga, gb = [g.numpy() for g in tape.gradient(value, [a, b])]
    for grad, numeric in (
            (ga, numerical_gradient(lambda x: consistency_reference(x, e2), e1)),
            (gb, numerical_gradient(lambda x: consistency_reference(e1, x), e2))):
        assert np.abs(numeric).max() > 1e-2
        np.testing.assert_allclose(grad, numeric, rtol=1e-3, atol=1e-5)


def test_float32_under_low_precision_inputs():
    rng = np.random.default_rng(3)
    e1 = tf.constant(_unit_rows(rng, (4, 3)), "bfloat16")
    e2 = tf.constant(_unit_rows(rng, (4, 3)), "bfloat16")
    got = SimilarityConsistency()(None, (e1, e2))
    assert got.dtype == tf.float32
    expected = consistency_reference(tf.cast(e1, "float64").numpy(), tf.cast(e2, "float64").numpy())
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_bad_inputs_are_clear_errors():
    e = np.eye(3, dtype="float32")
    with pytest.raises(ValueError, match="split=d_1"):
        SimilarityConsistency()(None, e)
    with pytest.raises(ValueError, match="split"):
        SimilarityConsistency(split=0)
    with pytest.raises(ValueError, match="sample_weight"):
        SimilarityConsistency()(np.zeros(3), (e, e), sample_weight=np.ones(3))


def test_multi_branch_loss_is_the_sum_of_its_terms():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 1, 1, 2, 2])
    e0, e1, e2 = _unit_rows(rng, (6, 5)), _unit_rows(rng, (6, 3)), _unit_rows(rng, (6, 2))
    ms = MultiSimilarityLoss(base=0.0)
    loss = MultiBranchLoss([ms, ms, ms], [5, 3, 2], [5, 3, 2], consistency_weight=0.7)
    packed = np.concatenate([e0, e1, e2, e0, e1, e2], axis=1)
    expected = (sum(float(ms(labels, e)) for e in (e0, e1, e2))
                + 0.7 * (consistency_reference(e0, e1) + consistency_reference(e0, e2)))
    np.testing.assert_allclose(float(loss(labels, packed)), expected, rtol=1e-5)
    # Proxy Anchor branches: x_b are similarities to proxies, e_b the embeddings.
    sims = [np.clip(rng.normal(size=(6, 3)), -1, 1).astype("float32") for _ in range(2)]
    pa = MultiBranchLoss([ProxyAnchorLoss(), ProxyAnchorLoss()], [3, 3], [5, 3],
                         consistency_weight=2.0)
    packed = np.concatenate(sims + [e0, e1], axis=1)
    expected = (sum(float(ProxyAnchorLoss()(labels, s)) for s in sims)
                + 2.0 * consistency_reference(e0, e1))
    np.testing.assert_allclose(float(pa(labels, packed)), expected, rtol=1e-5)
    with pytest.raises(ValueError, match="20 columns"):
        loss(labels, packed)


# --- distribution -----------------------------------------------------------------

_X = np.random.default_rng(12).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 2, 0, 1])


def _build_model():
    inputs = keras.Input(shape=(4,))
    first = keras.ops.normalize(keras.layers.Dense(3)(inputs), axis=-1)
    second = keras.ops.normalize(keras.layers.Dense(2)(inputs), axis=-1)
    return keras.Model(inputs, keras.layers.Concatenate()([first, second]))


def test_mirrored_value_and_step_equal_single_device_on_the_global_batch(mirrored):
    # The value each replica computes is the global one, divided by the replica count.
    e1, e2 = _unit_rows(np.random.default_rng(5), (8, 3)), _unit_rows(np.random.default_rng(6), (8, 2))
    loss = SimilarityConsistency()
    dataset = mirrored.experimental_distribute_dataset(
        tf.data.Dataset.from_tensors((e1, e2)).unbatch().batch(8))

    def replica_fn(a, b):
        return loss(None, (a, b))

    values = mirrored.experimental_local_results(mirrored.run(replica_fn, args=next(iter(dataset))))
    expected = consistency_reference(e1, e2)
    for value in values:
        np.testing.assert_allclose(float(value) * 2, expected, rtol=1e-5)

    initial = _build_model().get_weights()
    single = weights_after_one_step(tf.distribute.get_strategy(), _build_model, initial,
                                    SimilarityConsistency(split=3), _X, _Y)
    gathered = weights_after_one_step(mirrored, _build_model, initial,
                                      SimilarityConsistency(split=3), _X, _Y)
    local = weights_after_one_step(mirrored, _build_model, initial,
                                   SimilarityConsistency(split=3, gather_across_replicas=False),
                                   _X, _Y)
    assert max(np.abs(ws - w0).max() for w0, ws in zip(initial, single)) > 1e-3
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-6)
    assert max(np.abs(ws - wl).max() for ws, wl in zip(single, local)) > 1e-5
