"""Verification metrics and the calibrated threshold against all-pairs NumPy references and
scikit-learn (`roc_auc_score`, `roc_curve`)."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score, roc_curve

from kdml.evaluation.threshold import calibrate_threshold
from kdml.evaluation.verification import verification_metrics


def _tied_set(n=150, d=16, classes=12, seed=0):
    """Unit rows with four entries of +-0.5: every cosine is a multiple of 1/4, exact in
    float32 whatever the summation order, so many pairs tie."""
    rng = np.random.default_rng(seed)
    centres = np.zeros((classes, d), np.float32)
    x = np.zeros((n, d), np.float32)
    labels = rng.integers(0, classes, n)
    for c in range(classes):
        centres[c, rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    for i, c in enumerate(labels):
        x[i] = centres[c]
        if rng.random() < 0.6:  # move one coordinate: some positives drop, some negatives rise
            x[i] = 0
            support = rng.choice(d, 4, replace=False)
            keep = np.flatnonzero(centres[c])[:3]
            x[i, keep] = centres[c, keep]
            spare = [s for s in support if s not in keep][0]
            x[i, spare] = rng.choice([-0.5, 0.5])
    return x, labels


def _smooth_set(n=300, d=8, classes=20, seed=1):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n)
    centres = rng.normal(size=(classes, d))
    x = centres[labels] + 0.9 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32), labels


def _all_pairs(x, labels):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = (x @ x.T).astype(np.float32)
    i, j = np.triu_indices(len(x), k=1)
    return scores[i, j], labels[i] == labels[j]


@pytest.mark.parametrize("make", [_tied_set, _smooth_set])
@pytest.mark.parametrize("max_memory_bytes", [256 * 2**20, 8 * 150 * 7])
def test_verification_metrics_equal_all_pairs_references(make, max_memory_bytes):
    x, labels = make()
    fars = (0.2, 0.05, 1e-2, 1e-3, 1e-4)
    got = verification_metrics(x, labels, fars=fars, max_memory_bytes=max_memory_bytes,
                               return_curve=True)
    scores, same = _all_pairs(x, labels)
    pos, neg = scores[same], scores[~same]
    assert got["positive_pairs"] == len(pos) and got["negative_pairs"] == len(neg)
    fpr, tpr, _ = roc_curve(same, scores, drop_intermediate=False)
    # NumPy: FAR and TAR of every candidate threshold (each distinct score, and +inf)
    candidates = np.append(np.unique(scores), np.inf)
    far = 1 - np.searchsorted(np.sort(neg), candidates, side="left") / len(neg)
    tar = 1 - np.searchsorted(np.sort(pos), candidates, side="left") / len(pos)
    for f in fars:  # the best TAR over the thresholds with FAR <= f
        want = tar[far <= f + 1e-12].max()
        assert got[f"tar@far={f:g}"] == pytest.approx(want, abs=1e-12), f
        assert want == pytest.approx(tpr[fpr <= f + 1e-12].max(), abs=1e-12)  # scikit-learn
    assert got["roc_auc"] == pytest.approx(roc_auc_score(same, scores), abs=1e-12)
    # EER: the sklearn ROC polyline crossing FAR = 1 - TAR
    gap = fpr + tpr - 1
    a = int(np.argmax(gap >= 0))
    w = -gap[a - 1] / (gap[a] - gap[a - 1])
    assert got["eer"] == pytest.approx(fpr[a - 1] + w * (fpr[a] - fpr[a - 1]), abs=1e-12)
    # the curve is the sklearn polyline: same area
    assert np.trapezoid(got["curve"]["tar"], got["curve"]["far"]) == pytest.approx(
        roc_auc_score(same, scores), abs=1e-12)


def test_verification_metrics_edge_cases_and_errors():
    x = np.eye(3, dtype=np.float32)
    no_positive = verification_metrics(x, np.array([0, 1, 2]))
    assert np.isnan(no_positive["roc_auc"]) and no_positive["positive_pairs"] == 0
    with pytest.raises(ValueError, match="NaN or Inf"):
        verification_metrics(np.array([[np.nan, 0], [1, 0]]), np.array([0, 0]))
    with pytest.raises(ValueError, match="one label per embedding"):
        verification_metrics(x, np.array([0, 1]))


def _top1_reference(x, labels):
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    s = (x @ x.T).astype(np.float32)
    np.fill_diagonal(s, -np.inf)
    top = np.argmax(s, axis=1)
    return s[np.arange(len(x)), top], labels[top] == labels


@pytest.mark.parametrize("make", [_tied_set, _smooth_set])
@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95])
def test_threshold_for_precision_is_the_brute_force_sweep(make, target):
    x, labels = make()
    got = calibrate_threshold(x, labels, target_precision=target, max_memory_bytes=8 * 300 * 5)
    similarity, correct = _top1_reference(x, labels)
    _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
    known = (counts[inverse] > 1).sum()
    best = None
    for t in np.unique(similarity):  # ascending: the first that meets the target wins
        accept = similarity >= t
        if (accept & correct).sum() / accept.sum() >= target:
            best = t
            break
    # the strips' float32 products may differ from the full product's in the last bit
    assert got["threshold"] == pytest.approx(best, abs=1e-6)
    accept = similarity >= best
    assert got["precision"] == pytest.approx((accept & correct).sum() / accept.sum())
    assert got["recall"] == pytest.approx((accept & correct).sum() / known)
    scores, same = _all_pairs(x, labels)
    assert got["far"] == pytest.approx((scores[~same] >= best).mean())
    assert got["precision"] >= target and got["target"] == {"precision": target}


@pytest.mark.parametrize("make", [_tied_set, _smooth_set])
@pytest.mark.parametrize("target", [0.0, 1e-3, 1e-2, 0.1])
def test_threshold_for_far_is_the_lowest_meeting_the_target(make, target):
    x, labels = make()
    got = calibrate_threshold(x, labels, target_far=target, max_memory_bytes=8 * 300 * 5)
    scores, same = _all_pairs(x, labels)
    neg = scores[~same]
    t = np.float32(got["threshold"])
    # exact products (tied set): strict; else the full product's float32 scores may differ
    # from the strips' in the last bit
    eps = 0.0 if make is _tied_set else 1e-6
    assert (neg >= t + eps).mean() <= target
    assert got["far"] == pytest.approx((neg >= t).mean(), abs=2 / len(neg) if eps else 0)
    # any lower candidate (the highest impostor score below t) breaks the target
    lower = neg[neg < t - eps].max()
    assert (neg >= lower).mean() > target
    assert got["target"] == {"far": target} and got["negative_pairs"] == len(neg)


def test_threshold_errors():
    x, labels = _smooth_set()
    with pytest.raises(ValueError, match="exactly one of"):
        calibrate_threshold(x, labels)
    with pytest.raises(ValueError, match="No threshold reaches precision"):
        calibrate_threshold(x[:40], np.arange(40), target_precision=0.9)


def test_evaluate_runs_verification_up_to_the_auto_size(monkeypatch):
    from kdml.evaluation import protocols
    from kdml.evaluation.metrics import RetrievalMetrics

    x, labels = _smooth_set()
    metrics, report = RetrievalMetrics(), {}
    curve = protocols._verification(metrics, report, x, labels, "auto", (1e-2,), 2**20)
    assert metrics["tar@far=0.01"] == verification_metrics(x, labels, fars=(1e-2,))["tar@far=0.01"]
    assert curve["far"][0] == 0 and curve["tar"][-1] == 1
    monkeypatch.setattr(protocols, "VERIFICATION_AUTO_MAX", len(labels) - 1)
    metrics, report = RetrievalMetrics(), {}
    assert protocols._verification(metrics, report, x, labels, "auto", (1e-2,), 2**20) is None
    assert "tar@far=0.01" not in metrics and "--verification=true" in report["verification_skipped"]
    assert protocols._verification(metrics, report, x, labels, True, (1e-2,), 2**20) is not None
