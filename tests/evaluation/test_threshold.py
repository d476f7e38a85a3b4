"""The calibrated threshold's warnings (too few queries accepted, too close to 1.0) and its
calibration against a separate gallery side (a quantized search model's scoring)."""

import warnings

import numpy as np
import pytest

from kdml.evaluation.threshold import (MIN_ACCEPTANCE, QUANTIZATION_COSINE_ERROR,
                                       calibrate_threshold, threshold_warnings)


def _unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _pairs(num_classes=40, dim=16, noise=0.3, seed=0):
    """`num_classes` classes of two items around random directions."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.normal(size=(num_classes, dim)))
    x = np.repeat(centres, 2, axis=0) + noise * rng.normal(size=(2 * num_classes, dim)) / dim**.5
    return _unit(x).astype(np.float32), np.repeat(np.arange(num_classes), 2)


def test_a_degenerate_calibration_warns_in_one_line():
    """Two images of one glyph filed under two classes (cosine 0.99995): at FAR 0 the
    threshold must sit above them, at ~0.99995, where no other query reaches."""
    x, labels = _pairs()
    twin = _unit(x[:1] + 1e-2 * np.eye(16, dtype=np.float32)[1:2])
    x = np.concatenate([x, twin]).astype(np.float32)
    labels = np.append(labels, 99)
    cosine = float(x[0] @ x[-1])
    assert 1 - cosine < QUANTIZATION_COSINE_ERROR
    with pytest.warns(UserWarning) as caught:
        result = calibrate_threshold(x, labels, target_far=0.0, source="folder:cal")
    assert result["threshold"] == pytest.approx(cosine, abs=1e-6)
    # by hand: each query's best other item; accepted = those at or above the threshold
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    accepted = int((s.max(axis=1) >= np.float32(result["threshold"])).sum())
    assert result["accepted"] == accepted < MIN_ACCEPTANCE * len(x)
    assert result["acceptance"] == accepted / len(x)
    (line,) = [str(w.message) for w in caught]
    assert "\n" not in line and line.startswith("the threshold calibrated on folder:cal")
    assert f"accepts {accepted} of {len(x)} calibration queries" in line
    assert f"cosine {result['threshold']:.6f} is within 0.002 of 1.0" in line
    assert len(threshold_warnings(result)) == 2


def test_a_useful_calibration_is_silent():
    x, labels = _pairs()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = calibrate_threshold(x, labels, target_precision=0.95)
    assert result["acceptance"] >= MIN_ACCEPTANCE and threshold_warnings(result) == []
    assert threshold_warnings({**result, "threshold": 1 - QUANTIZATION_COSINE_ERROR / 2}) != []


@pytest.mark.parametrize("target", [{"target_precision": 0.9}, {"target_far": 0.01},
                                    {"target_far": 0.0}])
def test_calibration_against_a_gallery_side_is_the_brute_force_sweep(target):
    """Queries `x` against the rows `g` of the same items (e.g. quantized), own row left
    out: the threshold and rates from an all-pairs NumPy sweep."""
    x, labels = _pairs(num_classes=30, noise=0.8, seed=1)
    rng = np.random.default_rng(2)
    g = _unit(x + 0.05 * rng.normal(size=x.shape)).astype(np.float32)
    got = calibrate_threshold(x, labels, gallery=g, max_memory_bytes=8 * 60 * 7, warn=False,
                              **target)
    s = x @ g.T
    np.fill_diagonal(s, -np.inf)
    top = s.argmax(axis=1)
    best, correct = s.max(axis=1), labels[top] == labels
    impostors = s[labels[:, None] != labels[None, :]]  # ordered pairs i != j
    # the lowest threshold with FAR <= f lies just above an impostor score
    candidates = np.unique(np.nextafter(impostors, np.float32(2)))

    def rates(t):
        accept = best >= t
        precision = (accept & correct).sum() / accept.sum() if accept.any() else 1.0
        return precision, (accept & correct).sum() / len(x), (impostors >= t).mean()

    if "target_precision" in target:
        ok = [t for t in np.unique(best) if rates(t)[0] >= target["target_precision"]]
    else:
        ok = [t for t in candidates if rates(t)[2] <= target["target_far"]]
    want = min(ok)
    assert got["threshold"] == pytest.approx(float(want), abs=1e-7)
    precision, recall, far = rates(np.float32(got["threshold"]))
    assert (got["precision"], got["recall"], got["far"]) == pytest.approx(
        (precision, recall, far))
    assert got["negative_pairs"] == impostors.size


def test_a_gallery_side_equal_to_the_queries_changes_nothing_but_the_pair_count():
    x, labels = _pairs(noise=0.8)
    alone = calibrate_threshold(x, labels, target_far=0.02, warn=False)
    both = calibrate_threshold(x, labels, target_far=0.02, gallery=x.copy(), warn=False)
    # the same products (up to float32 summation order in another strip shape)
    assert both["threshold"] == pytest.approx(alone["threshold"], abs=1e-6)
    assert both["far"] == pytest.approx(alone["far"], abs=2 / alone["negative_pairs"])
    assert both["negative_pairs"] == 2 * alone["negative_pairs"]
    with pytest.raises(ValueError, match="same"):
        calibrate_threshold(x, labels, target_far=0.02, gallery=x[:-1])
