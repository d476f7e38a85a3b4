"""Proxies layer: cosine similarities against NumPy, float32 under mixed precision,
and the regularizer joining the losses (serialization: tests/test_serialization_contract.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers.proxies import Proxies


def numpy_cosine(embeddings, proxies):
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    p = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    return e @ p.T


def test_output_is_cosine_similarity_to_each_proxy(rng):
    layer = Proxies(num_classes=5)
    x = rng.normal(size=(4, 3)).astype("float32") * 7.0  # norms far from 1
    out = layer(x)
    assert tuple(out.shape) == (4, 5) and out.dtype == tf.float32
    assert layer.proxies.path.endswith("proxies") and tuple(layer.proxies.shape) == (5, 3)
    expected = numpy_cosine(x.astype("float64"), layer.proxies.numpy().astype("float64"))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)
    assert np.abs(out.numpy()).max() <= 1.0 + 1e-6


def test_he_normal_default_has_the_papers_std():
    # Kaiming normal over the class axis (PyTorch kaiming_normal_(mode="fan_out") on the
    # (C, d) matrix of the reference code): std = sqrt(2 / C).
    layer = Proxies(num_classes=50)
    layer.build((None, 400))
    std = float(np.std(layer.proxies.numpy()))
    np.testing.assert_allclose(std, np.sqrt(2 / 50), rtol=0.05)


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_policy_still_computes_in_float32(policy, rng):
    keras.mixed_precision.set_global_policy(policy)
    inputs = keras.Input(shape=(8,))
    outputs = Proxies(num_classes=6)(inputs)
    assert outputs.dtype == "float32"  # symbolic spec agrees with the eager output
    model = keras.Model(inputs, outputs)
    layer = model.layers[-1]
    assert layer.proxies.dtype == "float32"
    x = rng.normal(size=(3, 8)).astype("float32")
    out = model(x)
    assert out.dtype == tf.float32
    # Full float32 accuracy: a half-precision matmul would be off by ~1e-3 to 1e-2.
    expected = numpy_cosine(x.astype("float64"), layer.proxies.numpy().astype("float64"))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_input_gives_float32_cosine_of_the_rounded_input(dtype, rng):
    layer = Proxies(num_classes=4)
    x = tf.constant(rng.normal(size=(3, 5)), dtype=dtype)
    out = layer(x)
    assert out.dtype == tf.float32
    expected = numpy_cosine(tf.cast(x, "float64").numpy(), layer.proxies.numpy().astype("float64"))
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_regularizer_penalty_joins_layer_and_model_losses(rng):
    inputs = keras.Input(shape=(3,))
    layer = Proxies(num_classes=4, regularizer=keras.regularizers.L2(0.1))
    model = keras.Model(inputs, layer(inputs))
    model(rng.normal(size=(2, 3)).astype("float32"))
    expected = 0.1 * np.sum(np.square(layer.proxies.numpy()))
    assert len(layer.losses) == 1 and len(model.losses) == 1
    np.testing.assert_allclose(float(layer.losses[0]), expected, rtol=1e-6)
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-6)
    assert Proxies(num_classes=4)(np.ones((1, 3), "float32")) is not None
    assert len(Proxies(num_classes=4).losses) == 0


def test_compute_output_shape_and_rank_3_input():
    layer = Proxies(num_classes=7)
    assert layer.compute_output_shape((None, 16)) == (None, 7)
    assert tuple(layer(np.ones((2, 3, 4), "float32")).shape) == (2, 3, 7)


def test_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="num_classes=0"):
        Proxies(num_classes=0)
    with pytest.raises(ValueError, match="num_classes=2.5"):
        Proxies(num_classes=2.5)
    with pytest.raises(ValueError, match="input_shape"):
        Proxies(num_classes=3).build((None, None))


def test_proxy_regularizer_argument_and_its_former_name(rng):
    from kdml.regularizers import SoftOrthogonal

    new = Proxies(num_classes=4, proxy_regularizer=SoftOrthogonal(2.0))
    old = Proxies(num_classes=4, regularizer=SoftOrthogonal(2.0))
    for layer in (new, old):
        layer(rng.normal(size=(2, 6)).astype("float32"))
        assert isinstance(layer.proxy_regularizer, SoftOrthogonal)
        assert layer.regularizer is layer.proxy_regularizer
        assert (layer.get_config()["proxy_regularizer"]["config"]
                == SoftOrthogonal(2.0).get_config())
        assert "regularizer" not in layer.get_config()
    np.testing.assert_allclose(float(new.losses[0]),
                               float(SoftOrthogonal(2.0)(new.proxies)), rtol=1e-6)
    # A config saved before the rename (key "regularizer") still loads.
    legacy = {**Proxies(num_classes=4).get_config(), "regularizer": {
        "module": "keras.regularizers", "class_name": "L2", "config": {"l2": 0.5},
        "registered_name": None}}
    legacy.pop("proxy_regularizer")
    assert isinstance(Proxies.from_config(legacy).proxy_regularizer, keras.regularizers.L2)
    with pytest.raises(ValueError, match="proxy_regularizer"):
        Proxies(num_classes=4, proxy_regularizer="l2", regularizer="l2")
