"""ProxyAnchorLoss against a loop-per-proxy NumPy reference, finite differences, a
hand-worked example, and a one-step MirroredStrategy vs single-device comparison."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers.proxies import Proxies
from kdml.losses import ProxyAnchorLoss
from tests.helpers import numerical_gradient, weights_after_one_step


def proxy_anchor_reference(labels, sims, alpha, margin):
    """docs/design.md 3.1 written straight: a loop over proxies, float64."""
    batch, num_classes = sims.shape
    pos_total, num_present, neg_total = 0.0, 0, 0.0
    for p in range(num_classes):
        pos = [sims[x, p] for x in range(batch) if labels[x] == p]
        neg = [sims[x, p] for x in range(batch) if labels[x] != p]
        if pos:
            num_present += 1
            pos_total += math.log(1.0 + sum(math.exp(-alpha * (s - margin)) for s in pos))
        neg_total += math.log(1.0 + sum(math.exp(alpha * (s + margin)) for s in neg))
    return pos_total / num_present + neg_total / num_classes


def _loss_and_grad(loss_fn, labels, sims, dtype="float32"):
    sims = tf.constant(sims, dtype=dtype)
    with tf.GradientTape() as tape:
        tape.watch(sims)
        value = loss_fn(tf.constant(labels), sims)
    return value, tape.gradient(value, sims)


def test_hand_worked_example():
    # alpha = 2, delta = 0.1; labels [0, 0, 1]; 3 proxies, proxy 2 absent from the batch.
    sims = np.array([[0.5, -0.5, -0.1], [0.0, 0.0, -0.1], [1.0, 0.5, -0.1]])
    labels = np.array([0, 0, 1])
    # positive terms (P+ = {0, 1}):
    #   p0: samples 0, 1: log(1 + e^{-2(0.5-0.1)} + e^{-2(0.0-0.1)}) = log(1 + e^-0.8 + e^0.2)
    #   p1: sample 2:     log(1 + e^{-2(0.5-0.1)})                   = log(1 + e^-0.8)
    # negative terms (all 3 proxies):
    #   p0: sample 2:     log(1 + e^{2(1.0+0.1)})                    = log(1 + e^2.2)
    #   p1: samples 0, 1: log(1 + e^{2(-0.5+0.1)} + e^{2(0.0+0.1)})  = log(1 + e^-0.8 + e^0.2)
    #   p2: samples 0-2:  log(1 + 3 e^{2(-0.1+0.1)})                 = log(4)
    a = math.log(1 + math.exp(-0.8) + math.exp(0.2))
    b = math.log(1 + math.exp(-0.8))
    c = math.log(1 + math.exp(2.2))
    expected = (a + b) / 2 + (c + a + math.log(4)) / 3
    got = float(ProxyAnchorLoss(alpha=2.0, margin=0.1)(labels, sims.astype("float32")))
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    reference = proxy_anchor_reference(labels, sims, 2.0, 0.1)
    np.testing.assert_allclose(expected, reference, rtol=1e-12)


@pytest.mark.parametrize(
    "seed, labels",
    [
        (0, [0, 1, 2, 3, 0, 1, 2, 3]),  # every class present, twice
        (1, [0, 0, 0, 2, 2, 5, 5, 5]),  # classes 1, 3, 4 absent
        (2, [4, 1, 1, 3, 3, 3, 0, 0]),  # class 4 appears once, class 2 absent
        (3, [2, 2, 2, 2, 2, 2, 2, 2]),  # one class only: no negatives for proxy 2
    ],
)
def test_matches_reference_on_random_batches(seed, labels):
    rng = np.random.default_rng(seed)
    sims = rng.uniform(-1, 1, size=(8, 6)).astype("float32")
    for alpha, margin in [(32.0, 0.1), (4.0, 0.3)]:
        got = float(ProxyAnchorLoss(alpha=alpha, margin=margin)(np.array(labels), sims))
        expected = proxy_anchor_reference(labels, sims.astype("float64"), alpha, margin)
        np.testing.assert_allclose(got, expected, rtol=2e-5)


def test_gradient_matches_central_finite_differences():
    rng = np.random.default_rng(7)
    labels = np.array([0, 0, 1, 3, 3, 3])  # proxy 2 absent
    sims = rng.uniform(-1, 1, size=(6, 4))
    alpha, margin, h = 4.0, 0.1, 1e-5
    _, grad = _loss_and_grad(ProxyAnchorLoss(alpha=alpha, margin=margin), labels, sims)
    numeric = numerical_gradient(
        lambda s: proxy_anchor_reference(labels, s, alpha, margin), sims, h)
    assert np.abs(numeric).max() > 0.05  # non-trivial gradient
    np.testing.assert_allclose(grad.numpy(), numeric, rtol=1e-4, atol=2e-6)


def test_invariant_to_permuting_proxies_with_relabelling():
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 1, 4, 4, 2, 2, 2])  # class 3 absent
    sims = rng.uniform(-1, 1, size=(8, 5)).astype("float32")
    perm = np.array([3, 0, 4, 1, 2])  # new column j is old proxy perm[j]
    new_label_of = np.argsort(perm)  # old class c -> new column where perm == c
    loss = ProxyAnchorLoss()
    original = float(loss(labels, sims))
    permuted = float(loss(new_label_of[labels], sims[:, perm]))
    np.testing.assert_allclose(permuted, original, rtol=1e-6)
    # ... and relabelling without permuting the columns changes the loss.
    assert abs(float(loss(new_label_of[labels], sims)) - original) > 1e-3


def test_alpha_64_with_saturated_similarities_is_finite_and_exact():
    labels = np.array([0, 1, 1, 2])
    sims = np.array(
        [[-0.999, 0.999, 0.999], [0.999, -0.999, 0.999], [0.999, -1.0, 1.0], [1.0, 1.0, -1.0]],
        "float32",
    )  # every sample maximally wrong: alpha (s + delta) = 70.4
    value, grad = _loss_and_grad(ProxyAnchorLoss(alpha=64.0), labels, sims)
    assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))
    expected = proxy_anchor_reference(labels, sims.astype("float64"), 64.0, 0.1)
    np.testing.assert_allclose(value.numpy(), expected, rtol=1e-5)
    # and maximally right: the exponentials underflow, the gradient stays finite.
    value, grad = _loss_and_grad(ProxyAnchorLoss(alpha=64.0), labels, -sims)
    assert np.isfinite(value.numpy()) and np.all(np.isfinite(grad.numpy()))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_input_gives_float32_loss_of_the_rounded_input(dtype):
    rng = np.random.default_rng(5)
    labels = np.array([0, 1, 1, 3, 3, 0])
    sims = rng.uniform(-1, 1, size=(6, 4)).astype("float32")
    low = tf.constant(sims, dtype=dtype)
    loss = ProxyAnchorLoss()
    got = loss(labels, low)
    assert got.dtype == tf.float32
    expected = loss(labels, tf.cast(low, "float32"))
    np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-6)
    # The float32 path really is taken: casting the loss *output* of a half-precision
    # computation would not match the float64 reference of the rounded input this well.
    rounded = tf.cast(low, "float64").numpy()
    reference = proxy_anchor_reference(labels, rounded, 32.0, 0.1)
    np.testing.assert_allclose(got.numpy(), reference, rtol=2e-5)


def test_label_shapes_and_dtypes():
    rng = np.random.default_rng(2)
    sims = rng.uniform(-1, 1, size=(5, 3)).astype("float32")
    labels = np.array([2, 0, 0, 1, 2])
    loss = ProxyAnchorLoss()
    expected = float(loss(labels, sims))
    for variant in (labels.reshape(5, 1), labels.astype("float32"), labels.astype("int64")):
        np.testing.assert_allclose(float(loss(variant, sims)), expected, rtol=1e-7)


def test_rejects_sample_weight_and_bad_alpha():
    with pytest.raises(ValueError, match="sample_weight"):
        ProxyAnchorLoss()(np.array([0, 1]), np.zeros((2, 2), "float32"), sample_weight=np.ones(2))
    with pytest.raises(ValueError, match="alpha=0"):
        ProxyAnchorLoss(alpha=0)


_LABEL_ERROR = r"labels must be class indices in \[0, C\).*received a label of"


@pytest.mark.parametrize("bad_label", [4, -1, 100])
def test_label_outside_the_proxies_raises_eagerly_and_in_a_graph(bad_label):
    # Before: a label >= C (or < 0) matched no proxy, so it counted as a negative
    # for every proxy and the loss was a finite, wrong number.
    sims = np.random.default_rng(8).uniform(-1, 1, size=(3, 4)).astype("float32")
    labels = np.array([0, bad_label, 2])
    loss = ProxyAnchorLoss()
    with pytest.raises(ValueError, match=_LABEL_ERROR + f" {bad_label}\\. Fix:") as error:
        loss(labels, sims)
    assert "[0, 4)" in str(error.value)
    with pytest.raises(tf.errors.InvalidArgumentError, match=_LABEL_ERROR) as error:
        tf.function(loss)(labels, sims)
    assert f"[4] [; received a label of] [{bad_label}]" in str(error.value)
    # In range, all three modes agree.
    good = np.array([0, 3, 2])
    expected = proxy_anchor_reference(good, sims.astype("float64"), 32.0, 0.1)
    for fn in (loss, tf.function(loss), tf.function(loss, jit_compile=True)):
        np.testing.assert_allclose(float(fn(good, sims)), expected, rtol=1e-5)


def test_label_outside_the_proxies_stops_model_fit_and_is_nan_under_xla():
    x = np.random.default_rng(9).normal(size=(4, 3)).astype("float32")
    y = np.array([0, 1, 2, 3])  # 3 proxies: label 3 has none
    for jit_compile in (False, True):
        inputs = keras.Input(shape=(3,))
        model = keras.Model(inputs, Proxies(3)(inputs))
        model.compile(optimizer="sgd", loss=ProxyAnchorLoss(), jit_compile=jit_compile)
        if not jit_compile:
            with pytest.raises(tf.errors.InvalidArgumentError, match=_LABEL_ERROR):
                model.fit(x, y, batch_size=4, epochs=1, verbose=0)
        else:  # XLA compiles asserts away: the loss is NaN (kdml's NonFiniteLossGuard stops)
            history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
            assert np.isnan(history.history["loss"][0])


# --- distribution -----------------------------------------------------------------


_X = np.random.default_rng(11).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 0, 3, 3])  # replica 0: {0, 1}; replica 1: {0, 2, 3}


def _build_model():
    inputs = keras.Input(shape=(4,))
    embeddings = keras.ops.normalize(keras.layers.Dense(3)(inputs), axis=-1)
    return keras.Model(inputs, Proxies(5)(embeddings))


def _weights_after_one_step(strategy, initial_weights, loss):
    return weights_after_one_step(strategy, _build_model, initial_weights, loss, _X, _Y)


def test_mirrored_step_equals_single_device_step_on_the_global_batch(mirrored):
    initial = _build_model().get_weights()
    single = _weights_after_one_step(tf.distribute.get_strategy(), initial, ProxyAnchorLoss())
    gathered = _weights_after_one_step(mirrored, initial, ProxyAnchorLoss())
    local = _weights_after_one_step(
        mirrored, initial, ProxyAnchorLoss(gather_across_replicas=False)
    )
    for w0, ws in zip(initial, single):
        assert np.abs(ws - w0).max() > 1e-2  # the step moved every weight
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)
    # Per-replica losses are a different objective: the test above can fail.
    assert max(np.abs(ws - wl).max() for ws, wl in zip(single, local)) > 1e-2


def test_replica_value_is_global_loss_divided_by_replicas(mirrored):
    sims = np.random.default_rng(4).uniform(-1, 1, size=(8, 5)).astype("float32")
    loss = ProxyAnchorLoss()
    global_loss = proxy_anchor_reference(_Y, sims.astype("float64"), 32.0, 0.1)

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        return loss(tf.constant(_Y)[4 * r : 4 * r + 4], tf.constant(sims)[4 * r : 4 * r + 4])

    per_replica = mirrored.experimental_local_results(mirrored.run(replica_fn))
    np.testing.assert_allclose([v.numpy() for v in per_replica], [global_loss / 2] * 2, rtol=1e-5)

