"""MultiSimilarityLoss against a loop-per-anchor NumPy reference of the authors' code,
finite differences, invariances, edge cases, and a MirroredStrategy one-step check."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.distribute import all_gather
from kdml.losses import MultiSimilarityLoss
from tests.helpers import numerical_gradient, weights_after_one_step


def multi_similarity_reference(labels, emb, alpha=2.0, beta=50.0, base=0.5, epsilon=0.1):
    """Wang et al. 2019 as in the authors' loop: mine per anchor, then weight; float64."""
    sims = emb @ emb.T
    batch = len(labels)
    total = 0.0
    for i in range(batch):
        pos = [sims[i, j] for j in range(batch) if j != i and labels[j] == labels[i]]
        neg = [sims[i, k] for k in range(batch) if labels[k] != labels[i]]
        if not pos or not neg:
            continue
        kept_pos = [s for s in pos if s - epsilon < max(neg)]
        kept_neg = [s for s in neg if s + epsilon > min(pos)]
        if not kept_pos or not kept_neg:
            continue
        total += math.log(1 + sum(math.exp(-alpha * (s - base)) for s in kept_pos)) / alpha
        total += math.log(1 + sum(math.exp(beta * (s - base)) for s in kept_neg)) / beta
    return total / batch


def _unit_rows(rng, shape):
    x = rng.normal(size=shape)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _loss_and_grad(loss_fn, labels, emb, dtype="float32"):
    emb = tf.constant(emb, dtype=dtype)
    with tf.GradientTape() as tape:
        tape.watch(emb)
        value = loss_fn(tf.constant(labels), emb)
    return value, tape.gradient(value, emb)


def test_hand_worked_example():
    # e0 = (1, 0), e1 = (0.6, 0.8), e2 = (0.8, 0.6); labels [0, 0, 1]
    # S01 = 0.6, S02 = 0.8, S12 = 0.96.
    # anchor 0: pos {0.6} kept (0.5 < 0.8), neg {0.8} kept (0.9 > 0.6)
    # anchor 1: pos {0.6} kept (0.5 < 0.96), neg {0.96} kept (1.06 > 0.6)
    # anchor 2: no positive -> skipped, but counts in B = 3.
    emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.8, 0.6]], "float32")
    l0 = math.log(1 + math.exp(-2 * 0.1)) / 2 + math.log(1 + math.exp(50 * 0.3)) / 50
    l1 = math.log(1 + math.exp(-2 * 0.1)) / 2 + math.log(1 + math.exp(50 * 0.46)) / 50
    got = float(MultiSimilarityLoss()(np.array([0, 0, 1]), emb))
    np.testing.assert_allclose(got, (l0 + l1) / 3, rtol=1e-5)


@pytest.mark.parametrize(
    "seed, labels",
    [
        (0, [0, 0, 1, 1, 2, 2, 3, 3]),
        (1, [0, 0, 0, 1, 1, 1, 1, 5]),  # class 5 appears once
        (2, [3, 1, 3, 1, 3, 1, 7, 7]),  # non-contiguous labels
        (3, [0, 1, 2, 3, 4, 5, 6, 6]),  # mostly singletons
    ],
)
def test_matches_reference_on_random_batches(seed, labels):
    rng = np.random.default_rng(seed)
    emb = _unit_rows(rng, (8, 3)).astype("float32")
    for kwargs in [{}, dict(alpha=4.0, beta=20.0, base=0.3, epsilon=0.05)]:
        got = float(MultiSimilarityLoss(**kwargs)(np.array(labels), emb))
        expected = multi_similarity_reference(labels, emb.astype("float64"), **kwargs)
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)


def test_mining_drops_pairs_and_changes_the_loss():
    rng = np.random.default_rng(1)
    labels = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    emb = _unit_rows(rng, (8, 3))
    sims = emb @ emb.T
    # Independently count the pairs the paper's rule drops on this batch.
    dropped = 0
    for i in range(8):
        pos = [sims[i, j] for j in range(8) if j != i and labels[j] == labels[i]]
        neg = [sims[i, k] for k in range(8) if labels[k] != labels[i]]
        dropped += sum(s - 0.1 >= max(neg) for s in pos)
        dropped += sum(s + 0.1 <= min(pos) for s in neg)
    assert dropped > 0
    mined = float(MultiSimilarityLoss()(labels, emb.astype("float32")))
    unmined = float(MultiSimilarityLoss(epsilon=10.0)(labels, emb.astype("float32")))
    np.testing.assert_allclose(mined, multi_similarity_reference(labels, emb), rtol=1e-5)
    unmined_reference = multi_similarity_reference(labels, emb, epsilon=10.0)
    np.testing.assert_allclose(unmined, unmined_reference, rtol=1e-5)
    assert abs(mined - unmined) > 1e-3


def test_gradient_matches_central_finite_differences():
    rng = np.random.default_rng(4)
    labels = np.array([0, 0, 0, 1, 1, 2])
    emb = _unit_rows(rng, (6, 3))
    kwargs = dict(alpha=2.0, beta=10.0, base=0.5, epsilon=0.1)
    _, grad = _loss_and_grad(MultiSimilarityLoss(**kwargs), labels, emb)
    numeric = numerical_gradient(lambda e: multi_similarity_reference(labels, e, **kwargs), emb)
    assert np.abs(numeric).max() > 0.05
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-3, atol=1e-5)


def test_invariant_to_permuting_the_batch():
    rng = np.random.default_rng(8)
    labels = np.array([0, 0, 1, 1, 1, 2, 2, 3])
    emb = _unit_rows(rng, (8, 4)).astype("float32")
    perm = rng.permutation(8)
    loss = MultiSimilarityLoss()
    original = float(loss(labels, emb))
    assert original > 0
    np.testing.assert_allclose(float(loss(labels[perm], emb[perm])), original, rtol=1e-6)
    # Permuting only the embeddings (not the labels) is a different batch.
    assert abs(float(loss(labels, emb[perm])) - original) > 1e-4


def test_no_negative_in_batch_gives_zero_and_finite_zero_gradient():
    emb = _unit_rows(np.random.default_rng(0), (6, 3))
    value, grad = _loss_and_grad(MultiSimilarityLoss(), np.zeros(6, "int32"), emb)
    assert float(value) == 0.0
    assert np.all(np.isfinite(grad.numpy())) and np.all(grad.numpy() == 0.0)


def test_all_distinct_labels_give_zero_and_finite_zero_gradient():
    emb = _unit_rows(np.random.default_rng(0), (5, 3))
    value, grad = _loss_and_grad(MultiSimilarityLoss(), np.arange(5), emb)
    assert float(value) == 0.0
    assert np.all(grad.numpy() == 0.0)


def test_large_beta_with_close_negatives_is_finite():
    # beta (S - base) = 100 * 0.5 = 50 for identical negatives; positives at S = -1.
    emb = np.array([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]], "float32")
    labels = np.array([0, 0, 1, 1])
    value, grad = _loss_and_grad(MultiSimilarityLoss(alpha=64.0, beta=100.0), labels, emb)
    assert np.isfinite(float(value)) and np.all(np.isfinite(grad.numpy()))
    expected = multi_similarity_reference(labels, emb.astype("float64"), alpha=64.0, beta=100.0)
    np.testing.assert_allclose(float(value), expected, rtol=1e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_gives_float32_loss_of_the_rounded_input(dtype):
    rng = np.random.default_rng(6)
    labels = np.array([0, 0, 1, 1, 2, 2])
    low = tf.constant(_unit_rows(rng, (6, 3)), dtype=dtype)
    loss = MultiSimilarityLoss()
    got = loss(labels, low)
    assert got.dtype == tf.float32
    rounded = tf.cast(low, "float32")
    np.testing.assert_allclose(got.numpy(), loss(labels, rounded).numpy(), rtol=1e-6)
    reference = multi_similarity_reference(labels, tf.cast(low, "float64").numpy())
    np.testing.assert_allclose(got.numpy(), reference, rtol=1e-5)


def test_label_shapes_and_dtypes():
    rng = np.random.default_rng(2)
    emb = _unit_rows(rng, (6, 3)).astype("float32")
    labels = np.array([1, 0, 0, 1, 2, 2])
    loss = MultiSimilarityLoss()
    expected = float(loss(labels, emb))
    for variant in (labels.reshape(6, 1), labels.astype("float32"), labels.astype("int64")):
        np.testing.assert_allclose(float(loss(variant, emb)), expected, rtol=1e-7)


def test_rejects_sample_weight_and_bad_scales():
    with pytest.raises(ValueError, match="sample_weight"):
        MultiSimilarityLoss()(
            np.array([0, 1]), np.eye(2, dtype="float32"), sample_weight=np.ones(2)
        )
    with pytest.raises(ValueError, match="beta=-1"):
        MultiSimilarityLoss(beta=-1)


# --- distribution -----------------------------------------------------------------


def test_all_gather_concatenates_in_replica_order_and_is_identity_elsewhere(mirrored):
    x = tf.constant([[1.0], [2.0]])
    assert all_gather(x) is x

    def replica_fn():
        r = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, "float32")
        return all_gather(tf.fill([2, 1], r))

    for value in mirrored.experimental_local_results(mirrored.run(replica_fn)):
        np.testing.assert_array_equal(value.numpy().ravel(), [0, 0, 1, 1])


_X = np.random.default_rng(12).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 2, 0, 1])  # replica 1's 0 and 1 have positives only globally


def _build_model():
    inputs = keras.Input(shape=(4,))
    return keras.Model(inputs, keras.ops.normalize(keras.layers.Dense(3)(inputs), axis=-1))


def _weights_after_one_step(strategy, initial_weights, loss):
    return weights_after_one_step(strategy, _build_model, initial_weights, loss, _X, _Y)


def test_mirrored_step_equals_single_device_step_on_the_global_batch(mirrored):
    initial = _build_model().get_weights()
    # base = 0 keeps every mined pair active, so the step is not tiny.
    make_loss = lambda **kw: MultiSimilarityLoss(base=0.0, **kw)  # noqa: E731
    single = _weights_after_one_step(tf.distribute.get_strategy(), initial, make_loss())
    gathered = _weights_after_one_step(mirrored, initial, make_loss())
    local = _weights_after_one_step(mirrored, initial, make_loss(gather_across_replicas=False))
    assert max(np.abs(ws - w0).max() for w0, ws in zip(initial, single)) > 1e-2
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)
    assert max(np.abs(ws - wl).max() for ws, wl in zip(single, local)) > 1e-3
