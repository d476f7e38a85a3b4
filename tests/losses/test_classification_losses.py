"""The classification-based losses (docs/design.md 3.6): hand-worked values, finite
differences of the paper's formula, a 2-replica step equal to the 1-replica step, errors.
Agreement with pytorch-metric-learning: test_pml_classification.py; the serialization and
mixed-precision contract: tests/test_serialization_contract.py."""

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import Proxies
from kdml.losses import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss,
                         SoftTripleLoss, SubCenterArcFaceLoss, dominant_center_cleanup)
from tests.helpers import numerical_gradient, weights_after_one_step
from tests.losses.test_pml_classification import kdml_loss_and_grads, reference_loss


def _ce(logits, label):
    return math.log(sum(math.exp(z) for z in logits)) - logits[label]


def _value(loss, labels, cosines):
    return float(loss(np.array(labels), np.array(cosines, "float32")))


# --- hand-worked values ----------------------------------------------------------------


def test_normalized_softmax_by_hand():
    # T = 0.5: logits 2 * cos. Sample 0 (class 0): [1.6, -0.4, 0.0]; sample 1 (class 2):
    # [0.2, 0.6, -1.0]. L = mean of log-sum-exp minus the target logit.
    cos = [[0.8, -0.2, 0.0], [0.1, 0.3, -0.5]]
    expected = (math.log(math.exp(1.6) + math.exp(-0.4) + 1.0) - 1.6
                + math.log(math.exp(0.2) + math.exp(0.6) + math.exp(-1.0)) + 1.0) / 2
    np.testing.assert_allclose(_value(NormalizedSoftmaxLoss(0.5), [0, 2], cos), expected, rtol=1e-6)


def test_cosface_by_hand():
    # s = 4, m = 0.25, label 1: logits [4 * 0.5, 4 * (0.5 - 0.25)] = [2, 1]: log(e^2 + e) - 1.
    np.testing.assert_allclose(_value(CosFaceLoss(margin=0.25, scale=4.0), [1], [[0.5, 0.5]]),
                               math.log(math.exp(2) + math.e) - 1, rtol=1e-6)


def test_arcface_by_hand_on_both_branches():
    # m = 45 deg, s = 2. Sample 0: target at 45 deg -> cos 90 deg = 0; other logit 2 * 0.5.
    # Sample 1: target at 150 deg > 180 - 45: cos theta - m sin m = -0.866.. - (pi/4) sin 45.
    m = math.pi / 4
    c150 = math.cos(math.radians(150))
    sample0 = _ce([0.0, 2 * 0.5], 0)
    sample1 = _ce([2 * 0.2, 2 * (c150 - m * math.sin(m))], 1)
    cos = [[math.cos(m), 0.5], [0.2, c150]]
    np.testing.assert_allclose(_value(ArcFaceLoss(margin=45.0, scale=2.0), [0, 1], cos),
                               (sample0 + sample1) / 2, rtol=1e-5)


def test_subcenter_arcface_takes_each_class_best_center():
    # k = 3: class cosines are the maxima [0.5, 0.2]; m = 30 deg on the target (class 0)
    # gives cos 90 deg = 0; s = 3: log(1 + e^0.6).
    cos = [[0.5, -0.9, 0.1, 0.2, -0.3, 0.0]]
    np.testing.assert_allclose(
        _value(SubCenterArcFaceLoss(margin=30.0, scale=3.0, sub_centers=3), [0], cos),
        math.log(1 + math.exp(0.6)), rtol=1e-5)


def test_proxy_nca_by_hand():
    # softmax_scale 2: logits -2 |f - p|^2 = -2 (2 - 2 cos) -> [-0.8, -4.0] (+ const).
    np.testing.assert_allclose(_value(ProxyNCALoss(softmax_scale=2.0), [0], [[0.8, 0.0]]),
                               _ce([-0.8, -4.0], 0), rtol=1e-5)  # a small float32 difference


def test_soft_triple_by_hand():
    # K = 2, gamma = 0.5, la = 3, delta = 0.1. Class 0 centres at cos (0.6, 0.2): weights
    # softmax(1.2, 0.4); relaxed S0 = (0.6 e^1.2 + 0.2 e^0.4) / (e^1.2 + e^0.4). Class 1
    # centres both at cos 0: S1 = 0.
    s0 = (0.6 * math.exp(1.2) + 0.2 * math.exp(0.4)) / (math.exp(1.2) + math.exp(0.4))
    loss = SoftTripleLoss(centers_per_class=2, la=3.0, gamma=0.5, margin=0.1)
    np.testing.assert_allclose(_value(loss, [0], [[0.6, 0.2, 0.0, 0.0]]),
                               _ce([3 * (s0 - 0.1), 0.0], 0), rtol=1e-6)


# --- finite differences of the paper's formula ------------------------------------------

FD_CASES = {
    "NormalizedSoftmaxLoss": (NormalizedSoftmaxLoss, dict(temperature=0.2), 1),
    "CosFaceLoss": (CosFaceLoss, dict(margin=0.3, scale=5.0), 1),
    "ArcFaceLoss": (ArcFaceLoss, dict(margin=40.0, scale=5.0), 1),
    "SubCenterArcFaceLoss": (SubCenterArcFaceLoss, dict(margin=40.0, scale=5.0, sub_centers=2), 2),
    "ProxyNCALoss": (ProxyNCALoss, dict(softmax_scale=3.0), 1),
    "SoftTripleLoss": (SoftTripleLoss, dict(centers_per_class=3, la=5.0, gamma=0.2, margin=0.1), 3),
}


@pytest.mark.parametrize("name", sorted(FD_CASES))
def test_gradients_match_finite_differences_of_the_paper_formula(name):
    cls, kwargs, k = FD_CASES[name]
    rng = np.random.default_rng(3)
    labels = np.array([0, 0, 2, 1])  # class 3 absent, class 1 and 2 once
    embeddings, weights = rng.normal(size=(4, 3)), rng.normal(size=(4 * k, 3))
    _, grad_x, grad_w = kdml_loss_and_grads(cls(**kwargs), embeddings, labels, weights)
    numeric_x = numerical_gradient(
        lambda e: reference_loss(name, kwargs, e, labels, weights), embeddings)
    numeric_w = numerical_gradient(
        lambda w: reference_loss(name, kwargs, embeddings, labels, w), weights)
    assert np.abs(numeric_w).max() > 1e-2  # a gradient that can be wrong
    np.testing.assert_allclose(grad_x, numeric_x, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(grad_w, numeric_w, rtol=1e-3, atol=1e-5)


def test_arcface_gradient_is_finite_on_the_class_weight():
    # arccos' is infinite at cos = 1; the clipped target cosine keeps the gradient finite.
    x = tf.constant([[1.0, 0.0]])
    with tf.GradientTape() as tape:
        tape.watch(x)
        value = ArcFaceLoss()(np.array([0]), x)
    assert np.isfinite(float(value)) and np.all(np.isfinite(tape.gradient(value, x).numpy()))


# --- distribution ---------------------------------------------------------------------

_X = np.random.default_rng(11).normal(size=(8, 4)).astype("float32")
_Y = np.array([0, 0, 1, 1, 2, 0, 3, 3])  # replica 0: {0, 1}; replica 1: {0, 2, 3}


@pytest.mark.parametrize("name", sorted(FD_CASES))
def test_mirrored_step_equals_single_device_step_on_the_global_batch(name, mirrored):
    cls, kwargs, k = FD_CASES[name]

    def build_model():
        inputs = keras.Input(shape=(4,))
        embeddings = keras.ops.normalize(keras.layers.Dense(3)(inputs), axis=-1)
        return keras.Model(inputs, Proxies(5 * k)(embeddings))

    initial = build_model().get_weights()
    single = weights_after_one_step(tf.distribute.get_strategy(), build_model, initial,
                                    cls(**kwargs), _X, _Y)
    gathered = weights_after_one_step(mirrored, build_model, initial, cls(**kwargs), _X, _Y)
    for w0, ws in zip(initial, single):
        assert np.abs(ws - w0).max() > 1e-3  # the step moved every weight
    for ws, wg in zip(single, gathered):
        np.testing.assert_allclose(wg, ws, atol=1e-5)


def test_replica_value_is_global_loss_divided_by_replicas(mirrored):
    cosines = np.random.default_rng(4).uniform(-1, 1, size=(8, 5 * 3)).astype("float32")
    loss = SoftTripleLoss(centers_per_class=3)
    global_loss = float(loss(_Y, cosines))

    def replica_fn():
        r = tf.distribute.get_replica_context().replica_id_in_sync_group
        return loss(tf.constant(_Y)[4 * r: 4 * r + 4], tf.constant(cosines)[4 * r: 4 * r + 4])

    per_replica = mirrored.experimental_local_results(mirrored.run(replica_fn))
    np.testing.assert_allclose([v.numpy() for v in per_replica], [global_loss / 2] * 2, rtol=1e-5)


# --- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize("make, message", [
    (lambda: NormalizedSoftmaxLoss(temperature=0), "temperature=0"),
    (lambda: CosFaceLoss(margin=-0.1), "margin=-0.1"),
    (lambda: ArcFaceLoss(margin=180), r"in degrees, in \[0, 180\)"),
    (lambda: SubCenterArcFaceLoss(sub_centers=0), "sub_centers=0"),
    (lambda: ProxyNCALoss(softmax_scale=-1), "softmax_scale=-1"),
    (lambda: SoftTripleLoss(centers_per_class=2.5), "centers_per_class=2.5"),
])
def test_bad_arguments_are_one_line_errors(make, message):
    with pytest.raises(ValueError, match=message) as error:
        make()
    assert "\n" not in str(error.value)


def test_columns_not_a_multiple_of_the_centres_is_an_error_naming_the_fix():
    with pytest.raises(ValueError, match="7 columns, not a multiple of the 3 centres.*Fix"):
        SubCenterArcFaceLoss()(np.array([0]), np.zeros((1, 7), "float32"))


@pytest.mark.parametrize("loss", [CosFaceLoss(), SoftTripleLoss(centers_per_class=2)])
def test_label_outside_the_classes_raises_eagerly_and_in_a_graph(loss):
    cosines = np.zeros((2, 6), "float32")  # 6 classes (CosFace) / 3 classes of 2 (SoftTriple)
    bad = 6 if isinstance(loss, CosFaceLoss) else 3
    with pytest.raises(ValueError, match=rf"labels must be class indices in \[0, C\) = \[0, {bad}\)"):
        loss(np.array([0, bad]), cosines)
    with pytest.raises(tf.errors.InvalidArgumentError, match="received a label of"):
        tf.function(loss)(np.array([0, bad]), cosines)
    assert np.isnan(float(tf.function(loss, jit_compile=True)(np.array([0, bad]), cosines)))


def test_cleanup_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"centers \(C \* 3, 2\)"):
        dominant_center_cleanup(np.zeros((2, 2)), [0, 1], np.zeros((5, 2)), sub_centers=3)
