"""CodedResidualTransform against a loop NumPy reference of docs/design.md 3.3, invariances,
orthogonality of the coded residuals, finite-difference gradients (serialization:
tests/test_serialization_contract.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import CodedResidualTransform
from kdml.regularizers import SoftOrthogonal
from tests.helpers import numerical_gradient


def crt_reference(features, prototypes, kernel, bias, temperature, normalize_features=False,
                  intra_normalization=True, code_normalization="l2", skip_tokens=0):
    """docs/design.md 3.3 with explicit loops over images, prototypes and positions (float64)."""
    x_all = np.asarray(features, np.float64)
    x_all = x_all.reshape(x_all.shape[0], -1, x_all.shape[-1])[:, skip_tokens:]
    c = np.asarray(prototypes, np.float64)
    c_hat = c / np.linalg.norm(c, axis=1, keepdims=True)
    out = []
    for x in x_all:
        cos = np.array([[xn @ ck / np.linalg.norm(xn) for ck in c_hat] for xn in x])  # (N, K)
        logits = cos / temperature
        w = np.exp(logits - logits.max(1, keepdims=True))
        w /= w.sum(1, keepdims=True)
        if normalize_features:
            x = x / np.linalg.norm(x, axis=1, keepdims=True)
        codes = []
        for k, ck in enumerate(c_hat):
            z = sum(w[n, k] * (x[n] - (x[n] @ ck) * ck) for n in range(len(x))) / w[:, k].sum()
            codes.append(z / np.linalg.norm(z) if intra_normalization else z)
        code = np.concatenate(codes)
        if code_normalization == "l2":
            code = code / np.linalg.norm(code)
        e = code @ kernel + bias
        out.append(e / np.linalg.norm(e))
    return np.array(out)


def _features(shape, seed=0):
    return np.random.default_rng(seed).normal(size=shape).astype("float32")


def _reference_of(layer, features):
    prototypes = layer.prototypes.numpy()
    kernel, bias = [w.numpy() for w in layer.projection.weights]
    return crt_reference(features, prototypes, kernel, bias, layer.temperature,
                         layer.normalize_features, layer.intra_normalization,
                         layer.code_normalization, layer.skip_tokens)


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(normalize_features=True, temperature=0.5),
    dict(intra_normalization=False, code_normalization="none", temperature=1.0),
])
def test_matches_loop_reference_on_feature_maps(kwargs):
    features = _features((2, 3, 2, 5))
    layer = CodedResidualTransform(4, 6, **{"temperature": 0.1, **kwargs},
                                   prototype_initializer="random_normal",
                                   kernel_initializer="random_normal")
    got = layer(features).numpy()
    np.testing.assert_allclose(got, _reference_of(layer, features), atol=2e-5)


def test_tokens_skip_prefix_tokens_and_match_reference():
    tokens = _features((2, 7, 5), seed=1)
    layer = CodedResidualTransform(3, 4, temperature=0.2, skip_tokens=2)
    got = layer(tokens).numpy()
    np.testing.assert_allclose(got, _reference_of(layer, tokens), atol=2e-5)
    changed = tokens.copy()
    changed[:, :2] = 100.0  # class / distillation tokens do not matter
    np.testing.assert_allclose(layer(changed).numpy(), got, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 4, 4, 8), (3, 10, 8)])
def test_output_shape_dtype_and_unit_norm(shape):
    layer = CodedResidualTransform(5, 7, temperature=0.1)
    out = layer(_features(shape)).numpy()
    assert out.shape == (3, 7) and out.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)
    assert layer.compute_output_shape(shape) == (3, 7)


def test_invariant_to_permuting_spatial_positions():
    features = _features((2, 4, 3, 6), seed=2)
    layer = CodedResidualTransform(5, 8, temperature=0.1)
    flat = features.reshape(2, 12, 6)
    permuted = flat[:, np.random.default_rng(3).permutation(12)].reshape(2, 4, 3, 6)
    np.testing.assert_allclose(layer(permuted).numpy(), layer(features).numpy(), atol=1e-6)
    # and a map equals its token sequence
    np.testing.assert_allclose(layer(flat).numpy(), layer(features).numpy(), atol=1e-6)


def test_residuals_are_orthogonal_to_their_prototype_and_weights_sum_to_one():
    features = 5.0 * _features((2, 3, 3, 6), seed=4)
    layer = CodedResidualTransform(4, 8, temperature=0.1, prototype_initializer="random_normal")
    weights, residuals = layer.coded_residuals(features)
    assert tuple(weights.shape) == (2, 9, 4) and tuple(residuals.shape) == (2, 9, 4, 6)
    np.testing.assert_allclose(weights.numpy().sum(-1), 1.0, rtol=1e-6)
    c_hat = layer.prototypes.numpy() / np.linalg.norm(layer.prototypes.numpy(), axis=1,
                                                      keepdims=True)
    along = np.einsum("bnkc,kc->bnk", residuals.numpy(), c_hat)
    assert np.abs(along).max() < 1e-5 * np.abs(features).max()
    # residual + projection = feature: nothing else is removed
    x = features.reshape(2, 9, 1, 6)
    projection = np.einsum("bnc,kc->bnk", x[:, :, 0], c_hat)[..., None] * c_hat
    np.testing.assert_allclose(residuals.numpy() + projection, np.broadcast_to(x, residuals.shape),
                               atol=1e-5)


def test_gradient_wrt_prototypes_matches_finite_differences():
    features = _features((2, 2, 2, 3), seed=5)
    layer = CodedResidualTransform(2, 3, temperature=0.5, orthogonality_strength=0.0,
                                   prototype_initializer="random_normal",
                                   kernel_initializer="random_normal")
    layer(features)
    prototypes = layer.prototypes.numpy().astype(np.float64)
    kernel, bias = [w.numpy().astype(np.float64) for w in layer.projection.weights]
    target = np.random.default_rng(6).normal(size=(2, 3))

    def objective(p):  # a fixed linear functional of the embeddings
        return float(np.sum(crt_reference(features, p, kernel, bias, 0.5) * target))

    with tf.GradientTape() as tape:
        value = tf.reduce_sum(layer(features) * tf.constant(target, "float32"))
    grad = tape.gradient(value, layer.prototypes).numpy()
    numeric = numerical_gradient(objective, prototypes)
    assert np.abs(numeric).max() > 1e-2
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-4)


def test_soft_orthogonal_penalty_on_prototypes_joins_layer_losses():
    layer = CodedResidualTransform(3, 4, temperature=0.1, orthogonality_strength=2.0,
                                   prototype_initializer="random_normal")
    layer(_features((1, 2, 2, 5)))
    assert len(layer.losses) == 1
    expected = SoftOrthogonal(2.0, normalization="size")(layer.prototypes)  # the default
    np.testing.assert_allclose(float(layer.losses[0]), float(expected), rtol=1e-6)
    assert float(expected) > 0
    off = CodedResidualTransform(3, 4, orthogonality_strength=0.0)
    off(_features((1, 2, 2, 5)))
    assert off.losses == []


def test_mixed_precision_gives_float32_unit_norm_close_to_float32():
    features = _features((2, 3, 3, 8), seed=7)
    exact = CodedResidualTransform(4, 6, temperature=0.1)
    expected = exact(features).numpy()
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    mixed = CodedResidualTransform(4, 6, temperature=0.1)
    mixed(features)
    mixed.set_weights(exact.get_weights())
    got = mixed(tf.constant(features, "bfloat16")).numpy()
    assert got.dtype == np.float32 and mixed.prototypes.dtype == "float32"
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_allclose(got, expected, atol=0.05)


def test_bad_arguments_and_inputs_are_clear_errors():
    with pytest.raises(ValueError, match="num_prototypes"):
        CodedResidualTransform(0, 4)
    with pytest.raises(ValueError, match="temperature"):
        CodedResidualTransform(2, 4, temperature=0.0)
    with pytest.raises(ValueError, match="code_normalization"):
        CodedResidualTransform(2, 4, code_normalization="batch")
    with pytest.raises(ValueError, match="strength"):
        CodedResidualTransform(2, 4, orthogonality_strength=-1.0)
    with pytest.raises(ValueError, match=r"\(B, H, W, C\) or tokens"):
        CodedResidualTransform(2, 4)(np.zeros((2, 5), "float32"))
    with pytest.raises(ValueError, match="skip_tokens"):
        CodedResidualTransform(2, 4, skip_tokens=1)(np.zeros((2, 2, 2, 3), "float32"))
