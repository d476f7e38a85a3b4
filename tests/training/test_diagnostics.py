"""Proxy diagnostics against NumPy and hand-computed cases, and the callback's logs."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers.proxy_diagnostics import (EFFECTIVE_RANK, MAX_ABS_COSINE, MEAN_ABS_COSINE,
                                       ProxyDiagnostics, effective_rank, proxy_diagnostics)


def numpy_reference(p):
    p = p / np.linalg.norm(p, axis=1, keepdims=True)
    cosine = np.abs(p @ p.T)
    off = cosine[~np.eye(len(p), dtype=bool)]
    s = np.linalg.svd(p, compute_uv=False)
    q = s / s.sum()
    return off.mean(), off.max(), np.exp(-np.sum(q * np.log(q)))


@pytest.mark.parametrize("shape,block", [((7, 5), 1024), ((9, 4), 2), ((30, 64), 7)])
def test_matches_numpy_whatever_the_block_size(shape, block, rng):
    p = rng.normal(size=shape) * rng.uniform(0.1, 10, size=(shape[0], 1))
    got = proxy_diagnostics(p, block_size=block)
    mean, maximum, erank = numpy_reference(p)
    assert got[MEAN_ABS_COSINE] == pytest.approx(mean, rel=1e-10)
    assert got[MAX_ABS_COSINE] == pytest.approx(maximum, rel=1e-10)
    assert got[EFFECTIVE_RANK] == pytest.approx(erank, rel=1e-10)


def test_hand_computed_cases(rng):
    q, _ = np.linalg.qr(rng.normal(size=(8, 8)))
    ortho = proxy_diagnostics(q[:5] * 3.0)
    assert ortho[MEAN_ABS_COSINE] == pytest.approx(0.0, abs=1e-12)
    assert ortho[MAX_ABS_COSINE] == pytest.approx(0.0, abs=1e-12)
    assert ortho[EFFECTIVE_RANK] == pytest.approx(5.0)  # all singular values equal
    # Two directions at 60 degrees, each held by two proxies: cosines 1, 0.5, 0.5, 0.5, 0.5, 1.
    a, b = np.array([1.0, 0.0]), np.array([0.5, np.sqrt(3) / 2])
    pairs = proxy_diagnostics(np.stack([a, 2 * a, b, 3 * b]))
    assert pairs[MEAN_ABS_COSINE] == pytest.approx((1 + 1 + 4 * 0.5) / 6)
    assert pairs[MAX_ABS_COSINE] == pytest.approx(1.0)
    # Singular values of [a, a, b, b]: sqrt(2 * (1 +- cos 60)) = sqrt(3), 1.
    s = np.array([np.sqrt(3.0), 1.0])
    q_ = s / s.sum()
    assert pairs[EFFECTIVE_RANK] == pytest.approx(np.exp(-np.sum(q_ * np.log(q_))))
    assert effective_rank(np.ones((4, 3))) == pytest.approx(1.0)
    # A tight frame of 3 unit vectors in R^2 (120 degrees apart): erank 2, |cos| = 0.5.
    angles = np.array([0, 2, 4]) * np.pi / 3
    frame = proxy_diagnostics(np.stack([np.cos(angles), np.sin(angles)], axis=1))
    assert frame[EFFECTIVE_RANK] == pytest.approx(2.0)
    assert frame[MEAN_ABS_COSINE] == pytest.approx(0.5)


def test_rejects_fewer_than_two_proxies():
    with pytest.raises(ValueError, match=r"shape=\(1, 3\)"):
        proxy_diagnostics(np.ones((1, 3)))


def test_callback_adds_the_diagnostics_of_the_variable_to_the_epoch_logs(rng):
    p = rng.normal(size=(6, 4)).astype("float32")
    variable = keras.Variable(p)
    logs = {"loss": 1.0}
    ProxyDiagnostics(variable).on_epoch_end(0, logs)
    assert logs["loss"] == 1.0
    mean, maximum, erank = numpy_reference(p.astype("float64"))
    assert logs[MEAN_ABS_COSINE] == pytest.approx(mean, rel=1e-6)
    assert logs[MAX_ABS_COSINE] == pytest.approx(maximum, rel=1e-6)
    assert logs[EFFECTIVE_RANK] == pytest.approx(erank, rel=1e-6)


def test_callback_reads_a_mirrored_variable(mirrored, rng):
    p = rng.normal(size=(5, 3)).astype("float32")
    with mirrored.scope():
        variable = tf.Variable(p)
    logs = {}
    ProxyDiagnostics(variable).on_epoch_end(0, logs)
    assert logs[MEAN_ABS_COSINE] == pytest.approx(numpy_reference(p.astype("float64"))[0], rel=1e-6)
