"""`GeMPooling` and `PoolingHead(pooling="gem" | "cls_gem")` against NumPy, finite
differences in p, and the identities p = 1 (average) and large p (-> max)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import GeMPooling, PoolingHead
from tests.helpers import assert_model_save_load


def _gem_numpy(x, p, eps=1e-6):
    """Eq. 2 of Radenović et al.: (mean over positions of max(x, eps)^p)^(1/p), float64."""
    x = np.maximum(np.asarray(x, np.float64), eps)
    axes = tuple(range(1, x.ndim - 1))
    return np.mean(x ** p, axis=axes) ** (1.0 / p)


@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (3, 7, 4)])
def test_gem_matches_numpy_on_maps_and_tokens(shape, rng):
    x = rng.normal(size=shape).astype("float32")  # negatives are clamped to eps
    got = GeMPooling()(x).numpy()
    np.testing.assert_allclose(got, _gem_numpy(x, 3.0), rtol=1e-5, atol=1e-7)


def test_p_equal_to_one_is_average_pooling(rng):
    x = rng.uniform(0.1, 4.0, size=(2, 5, 5, 3)).astype("float32")
    np.testing.assert_allclose(GeMPooling(initial_p=1.0)(x).numpy(), x.mean(axis=(1, 2)),
                               rtol=1e-6)


def test_large_p_tends_to_max_without_overflow(rng):
    # x^20 of 1e3 is 1e60, beyond float32: the max-normalised form stays finite.
    x = rng.uniform(1.0, 1e3, size=(2, 16, 4)).astype("float32")
    got = GeMPooling(initial_p=20.0)(x).numpy()
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, _gem_numpy(x, 20.0), rtol=1e-5)
    assert np.all(got <= x.max(axis=1) + 1e-3) and np.all(got >= x.mean(axis=1))


def test_gradient_in_p_matches_finite_differences(rng):
    x = rng.uniform(0.05, 2.0, size=(2, 6, 3)).astype("float32")
    weights = rng.normal(size=(2, 3))
    layer = GeMPooling(initial_p=2.5)
    layer.build(x.shape)
    with tf.GradientTape() as tape:
        objective = tf.reduce_sum(layer(x) * weights)
    (analytic,) = tape.gradient(objective, [layer.p])
    h = 1e-5

    def f(p):
        return np.sum(_gem_numpy(x, p) * weights)

    numeric = (f(2.5 + h) - f(2.5 - h)) / (2 * h)
    np.testing.assert_allclose(float(analytic), numeric, rtol=1e-3)


def test_gradient_in_the_features_matches_finite_differences(rng):
    x = rng.uniform(0.2, 2.0, size=(1, 4, 2))
    layer = GeMPooling(initial_p=3.0)
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        objective = tf.reduce_sum(layer(xt) * [1.0, -2.0])
    analytic = tape.gradient(objective, xt).numpy()
    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        plus, minus = x.copy(), x.copy()
        plus[idx] += 1e-6
        minus[idx] -= 1e-6
        numeric[idx] = (np.sum(_gem_numpy(plus, 3.0) * [1, -2])
                        - np.sum(_gem_numpy(minus, 3.0) * [1, -2])) / 2e-6
    np.testing.assert_allclose(analytic, numeric, rtol=1e-3, atol=1e-5)


def test_p_is_clipped_to_its_range_in_the_forward_pass(rng):
    x = rng.uniform(0.1, 3.0, size=(2, 9, 4)).astype("float32")
    layer = GeMPooling(max_p=6.0)
    layer.build(x.shape)
    layer.p.assign(0.2)  # below 1: pools as p = 1
    np.testing.assert_allclose(layer(x).numpy(), x.mean(axis=1), rtol=1e-6)
    layer.p.assign(50.0)  # above max_p: pools as p = 6
    np.testing.assert_allclose(layer(x).numpy(), _gem_numpy(x, 6.0), rtol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_float32_under_mixed_precision(policy, rng):
    x = rng.uniform(0.0, 3.0, size=(2, 4, 4, 8)).astype("float32")
    keras.mixed_precision.set_global_policy(policy)
    layer = GeMPooling()
    head = PoolingHead(4, pooling="gem")
    out, embedding = layer(x), head(x)
    assert layer.compute_dtype == "float32" and layer.p.dtype == "float32"
    assert head.gem.compute_dtype == "float32" and out.dtype == "float32"
    assert embedding.dtype == "float32"
    np.testing.assert_allclose(out.numpy(), _gem_numpy(x, 3.0), rtol=1e-5)


def test_pooling_head_gem_and_cls_gem_match_numpy(rng):
    tokens = rng.uniform(0.0, 2.0, size=(2, 6, 4)).astype("float32")  # 2 prefix tokens
    gem = PoolingHead(4, pooling="gem", skip_tokens=2, kernel_initializer="identity")
    want = _gem_numpy(tokens[:, 2:], 3.0)
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(gem(tokens).numpy(), want, rtol=1e-5)

    both = PoolingHead(3, pooling="cls_gem", skip_tokens=2)
    both(tokens)
    kernel, bias = (w.numpy() for w in both.projection.weights)
    assert kernel.shape == (8, 3)  # class token (4) + GeM of the patch tokens (4)
    pooled = np.concatenate([tokens[:, 0], _gem_numpy(tokens[:, 2:], 3.0)], axis=1)
    want = pooled @ kernel + bias
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(both(tokens).numpy(), want, rtol=1e-5, atol=1e-6)


def test_avg_on_tokens_leaves_the_prefix_tokens_out(rng):
    tokens = rng.normal(size=(2, 5, 3)).astype("float32")
    head = PoolingHead(3, pooling="avg", skip_tokens=1, kernel_initializer="identity")
    want = tokens[:, 1:].mean(axis=1)
    np.testing.assert_allclose(head(tokens).numpy(),
                               want / np.linalg.norm(want, axis=1, keepdims=True), rtol=1e-5)


def test_trained_p_survives_a_keras_round_trip(rng):
    inputs = keras.Input((3, 3, 4))
    head = PoolingHead(5, pooling="gem", name="head")
    model = keras.Model(inputs, head(inputs))
    head.gem.p.assign(4.25)
    loaded = assert_model_save_load(model, rng.uniform(0, 1, (2, 3, 3, 4)).astype("float32"))
    assert float(loaded.get_layer("head").gem.p.numpy()) == 4.25


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="initial_p"):
        GeMPooling(initial_p=0.5)
    with pytest.raises(ValueError, match="epsilon"):
        GeMPooling(epsilon=0.0)
    with pytest.raises(ValueError, match="needs tokens"):
        PoolingHead(4, pooling="cls_gem").build((2, 3, 3, 8))
    with pytest.raises(ValueError, match="No patch tokens"):
        PoolingHead(4, pooling="gem", skip_tokens=3).build((2, 3, 8))
