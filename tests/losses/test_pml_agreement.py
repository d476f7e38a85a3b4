"""The pair and triplet losses equal pytorch-metric-learning's on its committed values, and
the NumPy loops of tests/losses/pair_references.py (the papers' formulas) on the same batches.

The fixtures (tests/losses/fixtures/pml_pairs.npz) come from
tools/make_pml_fixtures_pairs.py run with torch and pytorch-metric-learning in float64;
no torch is needed here. kdml computes in float32: the loss must agree to 1e-5 relative,
each gradient entry to 1e-5 relative plus 1e-5 of the largest entry (float32 round-off
on entries near 0).
"""

import json
import os

import numpy as np
import pytest
import tensorflow as tf

import kdml.losses
from tests.losses import pair_references

_PATH = os.path.join(os.path.dirname(__file__), "fixtures", "pml_pairs.npz")
_DATA = np.load(_PATH)
_META = json.loads(str(_DATA["meta"]))
_CASES = _META["cases"]


def _case_id(case):
    kwargs = ",".join(f"{k}={v}" for k, v in sorted(case["kdml_kwargs"].items()))
    return f"{case['key']}-{case['kdml_class']}({kwargs})-{case['batch']}"


def test_fixture_file_names_the_library_and_covers_every_loss_and_batch_kind():
    assert _META["library"].startswith("pytorch-metric-learning ")
    assert _META["dtype"] == "float64"
    assert {c["kdml_class"] for c in _CASES} == set(pair_references.REFERENCES)
    batches = {c["batch"] for c in _CASES}
    assert {"singleton_class", "no_valid_triplet", "one_class", "two_views"} <= batches
    mining = {c["kdml_kwargs"].get("mining", "all") for c in _CASES
              if c["kdml_class"] == "TripletMarginLoss"}
    assert mining == {"all", "hard", "semihard", "easy_positive"}
    # The batch without a positive pair really has none: every triplet loss is 0 there.
    zero = [c for c in _CASES if c["batch"] == "no_valid_triplet"
            and c["kdml_class"] == "TripletMarginLoss"]
    assert zero and all(float(_DATA[c["key"] + "_loss"]) == 0.0 for c in zero)
    # and the others are not trivially zero.
    assert all(float(_DATA[c["key"] + "_loss"]) > 0 for c in _CASES if c["batch"] == "balanced")


@pytest.mark.parametrize("case", _CASES, ids=_case_id)
def test_loss_and_gradient_equal_pytorch_metric_learning(case):
    key = case["key"]
    labels = _DATA[key + "_labels"]
    embeddings = tf.constant(_DATA[key + "_embeddings"], tf.float32)
    loss = getattr(kdml.losses, case["kdml_class"])(**case["kdml_kwargs"])
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        value = loss(labels, embeddings)
    grad = tape.gradient(value, embeddings).numpy()
    expected, expected_grad = float(_DATA[key + "_loss"]), _DATA[key + "_grad"]
    np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-7)
    scale = np.abs(expected_grad).max()
    np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5 * scale + 1e-9)
    # The paper's formula as a NumPy loop gives the same value on the same batch.
    reference = pair_references.REFERENCES[case["kdml_class"]](
        labels, _DATA[key + "_embeddings"], **case["kdml_kwargs"])
    np.testing.assert_allclose(reference, expected, rtol=1e-9, atol=1e-12)


_XBM_CASES = _META["xbm_cases"]


@pytest.mark.parametrize("case", _XBM_CASES, ids=lambda c: f"{c['key']}-{c['kdml_class']}")
def test_cross_batch_memory_equals_pytorch_metric_learning_step_by_step(case):
    """Each step's loss and gradient through one memory that wraps around (10 rows, 4 steps
    of 4), equal to PML's CrossBatchMemory around the same loss."""
    xbm = kdml.losses.CrossBatchMemory(
        getattr(kdml.losses, case["kdml_class"])(**case["kdml_kwargs"]),
        embedding_size=case["embedding_size"], memory_size=case["memory_size"])
    assert case["steps"] * 4 > case["memory_size"]  # the sequence wraps around
    for step in range(case["steps"]):
        key = f"{case['key']}_step{step}"
        embeddings = tf.constant(_DATA[key + "_embeddings"], tf.float32)
        with tf.GradientTape() as tape:
            tape.watch(embeddings)
            value = xbm(_DATA[key + "_labels"], embeddings)
        grad = tape.gradient(value, embeddings).numpy()
        expected, expected_grad = float(_DATA[key + "_loss"]), _DATA[key + "_grad"]
        np.testing.assert_allclose(float(value), expected, rtol=1e-5, atol=1e-7, err_msg=key)
        scale = np.abs(expected_grad).max()
        np.testing.assert_allclose(grad, expected_grad, rtol=1e-5, atol=1e-5 * scale + 1e-9,
                                   err_msg=key)
