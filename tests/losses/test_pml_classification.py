"""The classification-based losses against pytorch-metric-learning and against NumPy loops
written from the papers' formulas (docs/design.md 3.6).

The fixture `fixtures/pml_classification.npz` was written by
`tools/make_pml_fixtures_classification.py` with pytorch-metric-learning (its `meta`
names the version); CI has no torch. Each case feeds the same embeddings and class
weights to both libraries: kdml as `Proxies(C * k)` -> loss, PML with its own W.
"""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.layers import Proxies
from kdml.losses import (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss, ProxyNCALoss,
                         SoftTripleLoss, SubCenterArcFaceLoss, dominant_center_cleanup)

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "pml_classification.npz")
_DATA = np.load(FIXTURE)
META = json.loads(str(_DATA["meta"]))
LOSSES = {cls.__name__: cls for cls in (ArcFaceLoss, CosFaceLoss, NormalizedSoftmaxLoss,
                                        ProxyNCALoss, SoftTripleLoss, SubCenterArcFaceLoss)}


# --- the papers' formulas, one sample at a time, float64 ------------------------------


def _unit(x):
    return x / np.linalg.norm(x)


def _cosines(embedding, weights):
    return np.array([_unit(embedding) @ _unit(w) for w in weights])


def _cross_entropy(logits, label):
    top = max(logits)
    return top + math.log(sum(math.exp(z - top) for z in logits)) - logits[label]


def _arcface_target(cos, margin_deg):
    m = math.radians(margin_deg)
    theta = math.acos(min(1.0, max(-1.0, cos)))
    return math.cos(theta + m) if theta <= math.pi - m else cos - m * math.sin(m)


def reference_loss(name, kwargs, embeddings, labels, weights):
    """1/B sum_i of the paper's per-sample loss (docs/design.md 3.6), float64 loops."""
    total = 0.0
    for f, y in zip(embeddings, labels):
        cos = _cosines(f, weights)
        if name == "NormalizedSoftmaxLoss":  # Zhai & Wu Eq. 2
            logits = [c / kwargs.get("temperature", 0.05) for c in cos]
        elif name == "CosFaceLoss":  # CosFace Eq. 4
            s, m = kwargs.get("scale", 64.0), kwargs.get("margin", 0.35)
            logits = [s * (c - (m if j == y else 0.0)) for j, c in enumerate(cos)]
        elif name in ("ArcFaceLoss", "SubCenterArcFaceLoss"):  # ArcFace Eq. 3
            k = kwargs.get("sub_centers", 3) if name == "SubCenterArcFaceLoss" else 1
            per_class = [max(cos[c * k:(c + 1) * k]) for c in range(len(cos) // k)]
            s, m = kwargs.get("scale", 64.0), kwargs.get("margin", 28.6)
            logits = [s * (_arcface_target(c, m) if j == y else c) for j, c in enumerate(per_class)]
        elif name == "ProxyNCALoss":  # ProxyNCA++ Eq. 5: -|f^ - p^|^2 / T
            scale = kwargs.get("softmax_scale", 1.0)
            logits = [-scale * float(np.sum((_unit(f) - _unit(w)) ** 2)) for w in weights]
        elif name == "SoftTripleLoss":  # SoftTriple Eqs. 7-9
            k, la = kwargs.get("centers_per_class", 10), kwargs.get("la", 20.0)
            gamma, delta = kwargs.get("gamma", 0.1), kwargs.get("margin", 0.01)
            logits = []
            for c in range(len(cos) // k):
                sims = cos[c * k:(c + 1) * k]
                e = [math.exp(v / gamma) for v in sims]
                relaxed = sum(ei * v for ei, v in zip(e, sims)) / sum(e)
                logits.append(la * (relaxed - (delta if c == y else 0.0)))
        else:
            raise KeyError(name)
        total += _cross_entropy(logits, int(y))
    return total / len(labels)


# --- kdml on the fixture's inputs -----------------------------------------------------


def kdml_loss_and_grads(loss, embeddings, labels, weights):
    """(loss, d/d embeddings, d/d class weights) of Proxies(C * k) -> loss, float32."""
    proxies = Proxies(weights.shape[0], initializer=keras.initializers.Constant(weights))
    x = tf.Variable(embeddings.astype("float32"))
    proxies.build(x.shape)
    with tf.GradientTape() as tape:
        value = loss(labels, proxies(x))
    grad_x, grad_w = tape.gradient(value, [x, proxies.proxies])
    return float(value), grad_x.numpy(), grad_w.numpy()


CASES = sorted(META["cases"])


def _case(key):
    arrays = {field: _DATA[f"{key}/{field}"] for field in
              ("embeddings", "labels", "weights", "loss", "grad_embeddings", "grad_weights")}
    return META["cases"][key], arrays


def _assert_close(got, want, what):
    """1e-5 relative: elementwise rtol 1e-5, plus 1e-5 of the largest entry for entries
    near 0 (float32 computation vs PML's float64)."""
    want = np.asarray(want)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * max(np.abs(want).max(), 1e-6),
                               err_msg=what)


def test_fixture_names_the_library_and_covers_every_shared_loss():
    assert META["library"] == "pytorch-metric-learning" and META["version"]
    assert {case["loss"] for case in META["cases"].values()} == set(LOSSES)
    batches = {case["batch"] for case in META["cases"].values()}
    assert {"singleton_and_absent_b7", "single_image_b1", "one_class_b4"} <= batches
    # every loss appears with PML's defaults and with one other setting
    for name in LOSSES:
        tags = {key.split("/")[1] for key, case in META["cases"].items() if case["loss"] == name}
        assert "default" in tags and len(tags) >= 2, name


@pytest.mark.parametrize("key", CASES)
def test_value_and_gradients_equal_pytorch_metric_learning(key):
    case, arrays = _case(key)
    loss = LOSSES[case["loss"]](**case["kwargs"])
    value, grad_x, grad_w = kdml_loss_and_grads(loss, arrays["embeddings"], arrays["labels"],
                                                arrays["weights"])
    _assert_close(value, arrays["loss"], f"{key}: loss")
    _assert_close(grad_x, arrays["grad_embeddings"], f"{key}: d loss / d embeddings")
    _assert_close(grad_w, arrays["grad_weights"], f"{key}: d loss / d class weights")
    assert np.abs(arrays["grad_weights"]).max() > 0  # a gradient that can be wrong


@pytest.mark.parametrize("key", CASES)
def test_paper_formula_loop_equals_the_fixture(key):
    """The NumPy loops (independent of kdml's code) agree with PML too, so the three agree."""
    case, arrays = _case(key)
    expected = reference_loss(case["loss"], case["kwargs"], arrays["embeddings"], arrays["labels"],
                              arrays["weights"])
    np.testing.assert_allclose(expected, float(arrays["loss"]), rtol=1e-9)


@pytest.mark.parametrize("key", [k for k in CASES if k.startswith("SubCenterArcFaceLoss/")])
@pytest.mark.parametrize("threshold", [75, 40])
def test_dominant_center_cleanup_equals_pml_get_outliers(key, threshold):
    case, arrays = _case(key)
    result = dominant_center_cleanup(arrays["embeddings"], arrays["labels"], arrays["weights"],
                                     sub_centers=case["centers_per_class"], threshold=threshold)
    np.testing.assert_array_equal(result.outliers, _DATA[f"{key}/outliers_{threshold}"])
    kept = np.setdiff1d(np.arange(len(arrays["labels"])), result.outliers)
    np.testing.assert_array_equal(result.kept, kept)
    present = np.unique(arrays["labels"])
    np.testing.assert_array_equal(result.dominant_centers[present],
                                  _DATA[f"{key}/dominant_{threshold}"])
