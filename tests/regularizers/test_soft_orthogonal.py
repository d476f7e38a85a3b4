"""SoftOrthogonal: NumPy reference for both modes and both normalisations (the paper's
unnormalised sum by default), finite-difference gradients, its zeros (orthonormal rows,
tight frames), scale invariance, serialization, and one count per global step on 2
replicas."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers.proxies import Proxies
from kdml.regularizers import SoftOrthogonal
from tests.helpers import assert_config_roundtrip, numerical_gradient
from tests.helpers import assert_model_save_load
from tests.helpers import weights_after_one_step


def numpy_soft_orthogonal(p, strength, mode, normalization="none"):
    """lambda ||P^ P^T - I||_F^2 (or the columns form), over C^2 for "size"."""
    p = np.asarray(p, np.float64)
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    c, d = p.shape
    if mode == "auto":
        mode = "rows" if c <= d else "columns"
    if mode == "rows":
        deviation = p @ p.T - np.eye(c)
    else:
        deviation = p.T @ p - (c / d) * np.eye(d)
    return strength * np.sum(deviation ** 2) / (c ** 2 if normalization == "size" else 1)


@pytest.mark.parametrize("shape", [(5, 8), (12, 4), (6, 6)])
@pytest.mark.parametrize("mode", ["auto", "rows", "columns"])
@pytest.mark.parametrize("normalization", ["none", "size"])
def test_matches_numpy_reference(shape, mode, normalization, rng):
    p = rng.normal(size=shape).astype("float32") * 3.0
    got = float(SoftOrthogonal(0.7, mode, normalization)(p))
    np.testing.assert_allclose(got, numpy_soft_orthogonal(p, 0.7, mode, normalization), rtol=1e-5)


def test_default_is_the_papers_unnormalised_sum_of_squared_cosines(rng):
    """rows: ||P^ P^T - I||_F^2 = sum over i != j of cos^2(p_i, p_j), no 1/C^2."""
    p = rng.normal(size=(5, 7))
    unit = p / np.linalg.norm(p, axis=1, keepdims=True)
    cosines = unit @ unit.T
    off_diagonal = np.sum(cosines ** 2) - 5
    assert SoftOrthogonal(2.0).normalization == "none"
    np.testing.assert_allclose(float(SoftOrthogonal(2.0)(p.astype("float32"))), 2.0 * off_diagonal,
                               rtol=1e-5)
    # "size" with strength s equals the paper's form with lambda = s / C^2.
    p32 = p.astype("float32")
    np.testing.assert_allclose(float(SoftOrthogonal(10.0, normalization="size")(p32)),
                               float(SoftOrthogonal(10.0 / 25)(p32)), rtol=1e-6)


def test_rows_and_columns_differ_by_the_constant_c_times_c_minus_d_over_d(rng):
    c, d = 12, 4
    p = rng.normal(size=(c, d)).astype("float32")
    rows, columns = (float(SoftOrthogonal(1.0, m)(p)) for m in ("rows", "columns"))
    np.testing.assert_allclose(rows - columns, c * (c - d) / d, rtol=1e-5)
    # Random proxies, "size": about the mean squared cosine 1/d, whatever C (C <= d here).
    big = rng.normal(size=(64, 256)).astype("float32")
    np.testing.assert_allclose(float(SoftOrthogonal(1.0, "rows", "size")(big)), 63 / 64 / 256,
                               rtol=0.1)


@pytest.mark.parametrize("mode", ["rows", "columns"])
@pytest.mark.parametrize("shape", [(4, 6), (7, 3)])
def test_gradient_matches_finite_differences_of_the_reference(mode, shape, rng):
    p = rng.normal(size=shape)
    variable = tf.Variable(p.astype("float32"))
    with tf.GradientTape() as tape:
        value = SoftOrthogonal(2.0, mode)(variable)
    grad = tape.gradient(value, variable).numpy()
    numeric = numerical_gradient(lambda x: numpy_soft_orthogonal(x, 2.0, mode), p)
    np.testing.assert_allclose(grad, numeric, atol=2e-5 * np.abs(numeric).max())
    if shape[0] > shape[1]:  # C > d: both modes have the same gradient
        other = "rows" if mode == "columns" else "columns"
        with tf.GradientTape() as tape:
            value = SoftOrthogonal(2.0, other)(variable)
        np.testing.assert_allclose(tape.gradient(value, variable).numpy(), grad,
                                   atol=1e-6 * np.abs(grad).max())


def test_zero_for_orthonormal_rows_of_any_scale(rng):
    q, _ = np.linalg.qr(rng.normal(size=(16, 16)))
    p = (q[:5] * rng.uniform(0.1, 10.0, size=(5, 1))).astype("float32")
    for mode in ("auto", "rows"):
        assert float(SoftOrthogonal(3.0, mode)(p)) == pytest.approx(0.0, abs=1e-6)
    with tf.GradientTape() as tape:
        variable = tf.Variable(p)
        value = SoftOrthogonal(3.0)(variable)
    np.testing.assert_allclose(tape.gradient(value, variable).numpy(), 0.0, atol=1e-5)


def test_columns_mode_is_zero_for_a_tight_frame_and_rows_mode_is_not(rng):
    # The union of 3 orthonormal bases of R^4: C = 12 unit rows with P^T P = 3 I = (C/d) I.
    bases = [np.linalg.qr(rng.normal(size=(4, 4)))[0] for _ in range(3)]
    p = np.concatenate(bases).astype("float32")
    assert float(SoftOrthogonal(1.0, "columns")(p)) == pytest.approx(0.0, abs=1e-6)
    assert float(SoftOrthogonal(1.0, "auto")(p)) == pytest.approx(0.0, abs=1e-6)
    # rows cannot reach zero when C > d; its floor is C (C - d) / d.
    assert float(SoftOrthogonal(1.0, "rows")(p)) == pytest.approx(12 * 8 / 4, rel=1e-5)


def test_invariant_to_the_scale_of_each_proxy(rng):
    p = rng.normal(size=(6, 5)).astype("float32")
    scaled = p * rng.uniform(0.01, 100.0, size=(6, 1)).astype("float32")
    for mode in ("rows", "columns"):
        np.testing.assert_allclose(float(SoftOrthogonal(1.0, mode)(scaled)),
                                   float(SoftOrthogonal(1.0, mode)(p)), rtol=1e-5)


def test_float32_under_half_precision_weights(rng):
    p = rng.normal(size=(6, 8))
    value = SoftOrthogonal(1.0)(tf.constant(p, "bfloat16"))
    assert value.dtype == tf.float32
    rounded = tf.cast(tf.constant(p, "bfloat16"), "float64").numpy()
    np.testing.assert_allclose(float(value), numpy_soft_orthogonal(rounded, 1.0, "auto"), rtol=1e-5)


def test_argument_errors_name_the_value():
    with pytest.raises(ValueError, match="strength=-1.0"):
        SoftOrthogonal(-1.0)
    with pytest.raises(ValueError, match="strength=None"):
        SoftOrthogonal("strong")
    with pytest.raises(ValueError, match="mode='diagonal'"):
        SoftOrthogonal(1.0, mode="diagonal")
    with pytest.raises(ValueError, match="normalization='mean'"):
        SoftOrthogonal(1.0, normalization="mean")
    with pytest.raises(ValueError, match=r"shape=\(3,\)"):
        SoftOrthogonal(1.0)(np.ones(3, "float32"))


def test_config_roundtrip_and_keras_names():
    clone = assert_config_roundtrip(SoftOrthogonal(0.25, mode="columns", normalization="size"))
    assert (clone.strength, clone.mode, clone.normalization) == (0.25, "columns", "size")
    # A penalty saved before `normalization` existed keeps its 1/C^2.
    assert SoftOrthogonal.from_config({"strength": 1.0, "mode": "auto"}).normalization == "size"
    config = keras.regularizers.serialize(SoftOrthogonal(1.0))
    assert isinstance(keras.regularizers.get(config), SoftOrthogonal)


def test_proxies_layer_carries_the_penalty_and_survives_a_keras_round_trip(rng):
    inputs = keras.Input(shape=(6,))
    layer = Proxies(num_classes=4, proxy_regularizer=SoftOrthogonal(0.5, "rows"))
    model = keras.Model(inputs, layer(inputs))
    expected = numpy_soft_orthogonal(layer.proxies.numpy(), 0.5, "rows")
    np.testing.assert_allclose(float(model.losses[0]), expected, rtol=1e-5)
    loaded = assert_model_save_load(model, rng.normal(size=(3, 6)).astype("float32"))
    reg = loaded.layers[-1].proxy_regularizer
    assert isinstance(reg, SoftOrthogonal) and (reg.strength, reg.mode) == (0.5, "rows")
    np.testing.assert_allclose(float(loaded.losses[0]), expected, rtol=1e-5)


def _zero_loss(y_true, y_pred):
    return 0.0 * keras.ops.mean(y_pred, axis=-1)


def test_counted_once_per_global_step_on_two_replicas(mirrored, rng):
    """One SGD step with only the penalty's gradient: 2 replicas == 1 device == tape.

    Keras sums the replicas' gradients and scales `model.losses` by 1/replicas; a
    penalty counted per replica would move the proxies twice as far here."""
    c, d, strength, lr = 6, 4, 5.0, 0.1

    def build_model():
        inputs = keras.Input(shape=(d,))
        return keras.Model(inputs, Proxies(c, proxy_regularizer=SoftOrthogonal(strength))(inputs))

    initial = [rng.normal(size=(c, d)).astype("float32")]
    x = rng.normal(size=(8, d)).astype("float32")
    y = np.arange(8, dtype="int32") % c
    single = weights_after_one_step(tf.distribute.get_strategy(), build_model, initial,
                                    _zero_loss, x, y)
    double = weights_after_one_step(mirrored, build_model, initial, _zero_loss, x, y)
    variable = tf.Variable(initial[0])
    with tf.GradientTape() as tape:
        value = SoftOrthogonal(strength)(variable)
    expected = initial[0] - lr * tape.gradient(value, variable).numpy()
    assert np.abs(expected - initial[0]).max() > 1e-3  # the step is visible
    np.testing.assert_allclose(single[0], expected, atol=1e-6)
    np.testing.assert_allclose(double[0], expected, atol=1e-6)
