"""Verification metrics over all pairs, blocked: TAR@FAR, ROC AUC, EER, the TAR-FAR curve.

A pair is two different items `i < j` of the set; positive (genuine) when their labels
agree, negative (impostor) otherwise; its score is the cosine of their embeddings. With
P positives and M negatives, for an accept rule `score >= t`:

- `FAR(t) = #{negatives >= t} / M` (false accept rate), `TAR(t) = #{positives >= t} / P`.
- `tar@far=f`: the highest TAR over the thresholds with `FAR(t) <= f`. It is the share of
  positives `p` with `#{negatives >= p} <= floor(f M)`; equal to reading scikit-learn's
  `roc_curve` at the last point with `fpr <= f`.
- `roc_auc`: `P(positive > negative) + P(equal) / 2` over all (positive, negative)
  couples: scikit-learn's `roc_auc_score` on all pairs.
- `eer`: the point of the ROC polyline (linear between its vertices, as `roc_curve`
  draws it) where `FAR = 1 - TAR` (false reject rate).

All exact, with no `N^2` memory: the positives (few: sum over classes of `n_c (n_c - 1)
/ 2`) are computed class by class (in strips) and sorted; the negatives are never stored: one pass
of `(B, N)` strips `S = X_b X^T` (upper triangle) counts, per distinct positive score
`u`, the negatives `> u` and `>= u` (`numpy.searchsorted` of each strip into the sorted
positives). Those counts are the ROC's vertices, so every figure above is exact (ties
included). Memory: the `(N, d)` set, the P positives, one `(B, N)` strip
(`max_memory_bytes`); time: the `N^2 d / 2` products plus `M log P` comparisons.
"""

from __future__ import annotations

import numpy as np

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


def normalized_rows(embeddings, name="embeddings") -> np.ndarray:
    """`(N, d)` float32 rows of unit norm; a one-line ValueError for other shapes or NaN."""
    x = np.asarray(embeddings, np.float32)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"Expected `{name}` of shape (N, d) with N >= 2. Received: "
                         f"shape={x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"`{name}` holds NaN or Inf values (rows "
                         f"{np.flatnonzero(~np.isfinite(x).all(axis=1))[:5].tolist()}...): "
                         "check the model that produced them.")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def check_labels(labels, count: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (count,):
        raise ValueError(f"Expected one label per embedding, shape ({count},). Received: "
                         f"labels.shape={labels.shape}")
    return labels


def strip_rows(num_items: int, max_memory_bytes: int) -> int:
    """Rows per `(B, N)` float32 strip within `max_memory_bytes` (two live copies)."""
    return int(max(1, min(num_items, max_memory_bytes // (8 * max(num_items, 1)))))


def upper_strips(x: np.ndarray, max_memory_bytes: int = 256 * 2**20):
    """Yields `(start, stop, strip)`: `strip = x[start:stop] @ x.T`, `(B, N)` float32."""
    rows = strip_rows(len(x), max_memory_bytes)
    for start in range(0, len(x), rows):
        stop = min(start + rows, len(x))
        yield start, stop, x[start:stop] @ x.T


def upper_mask(start: int, stop: int, num_items: int) -> np.ndarray:
    """`(B, N)` bool: column `j > i` for the strip's rows `i` (each pair counted once)."""
    return np.arange(num_items)[None, :] > np.arange(start, stop)[:, None]


def positive_scores(x: np.ndarray, labels: np.ndarray,
                    max_memory_bytes: int = 256 * 2**20) -> np.ndarray:
    """Sorted float32 scores of all positive pairs `i < j`, class by class (a large
    class in strips of its rows)."""
    order = np.argsort(labels, kind="stable")
    bounds = np.flatnonzero(np.diff(labels[order]) != 0) + 1
    scores = []
    for members in np.split(order, bounds):
        if len(members) < 2:
            continue
        members = np.sort(members)
        for start, stop, strip in upper_strips(x[members], max_memory_bytes):
            scores.append(strip[upper_mask(start, stop, len(members))])
    if not scores:
        return np.zeros(0, np.float32)
    return np.sort(np.concatenate(scores).astype(np.float32))


def count_negatives(x, labels, thresholds, *, max_memory_bytes=256 * 2**20):
    """For sorted `thresholds` `(T,)`: `(#neg > t, #neg >= t)` per threshold, and M.

    One blocked pass over the upper-triangle strips; the negatives are not stored.
    """
    thresholds = np.asarray(thresholds, np.float32)
    above = np.zeros(len(thresholds) + 1, np.int64)    # bincount of searchsorted 'left'
    at_or_above = np.zeros(len(thresholds) + 1, np.int64)
    total = 0
    for start, stop, strip in upper_strips(x, max_memory_bytes):
        keep = upper_mask(start, stop, len(x)) & (labels[start:stop, None] != labels[None, :])
        negatives = strip[keep]
        total += negatives.size
        # a negative v is > t_k iff searchsorted(t, v, 'left') > k; >= t_k iff 'right' > k
        above += np.bincount(np.searchsorted(thresholds, negatives, side="left"),
                             minlength=len(thresholds) + 1)
        at_or_above += np.bincount(np.searchsorted(thresholds, negatives, side="right"),
                                   minlength=len(thresholds) + 1)
    # #{v : index(v) > k} = suffix sums from k + 1
    greater = np.cumsum(above[::-1])[::-1][1:]
    greater_equal = np.cumsum(at_or_above[::-1])[::-1][1:]
    return greater, greater_equal, total


def roc_vertices(positives_sorted, negatives_greater, negatives_greater_equal, num_negatives):
    """ROC vertices `(far, tar)` in increasing order, from (0, 0) to (1, 1).

    For each distinct positive score `u` (descending): `(#neg > u, #pos > u)` then
    `(#neg >= u, #pos >= u)`; between two of them the polyline only moves along FAR.
    """
    num_positives = len(positives_sorted)
    unique, first = np.unique(positives_sorted, return_index=True)
    last = np.append(first[1:], num_positives)
    pos_ge = num_positives - first        # #pos >= u
    pos_gt = num_positives - last         # #pos > u
    far = np.stack([negatives_greater, negatives_greater_equal], axis=1)[::-1].reshape(-1)
    tar = np.stack([pos_gt, pos_ge], axis=1)[::-1].reshape(-1)
    far = np.concatenate([[0], far, [num_negatives]]) / max(num_negatives, 1)
    tar = np.concatenate([[0], tar, [num_positives]]) / max(num_positives, 1)
    return far.astype(np.float64), tar.astype(np.float64), unique


def equal_error_rate(far, tar) -> float:
    """Where the ROC polyline `(far, tar)` (increasing) crosses `far = 1 - tar`."""
    gap = far + tar - 1.0                 # non-decreasing along the polyline
    after = int(np.argmax(gap >= 0))
    if after == 0:
        return float(far[0])
    before = after - 1
    step = gap[after] - gap[before]
    w = 0.0 if step == 0 else -gap[before] / step
    return float(far[before] + w * (far[after] - far[before]))


def verification_metrics(embeddings, labels, *, fars=DEFAULT_FARS,
                         max_memory_bytes=256 * 2**20, return_curve=False):
    """TAR@FAR, ROC AUC and EER over all pairs of one labelled set (module docstring).

    Args:
        embeddings: `(N, d)` floats (L2-normalised here; the score is their cosine).
        labels: `(N,)` class labels.
        fars: the FAR levels of `tar@far=<f>`.
        max_memory_bytes: budget of one `(B, N)` strip.
        return_curve: also return `{"far": (V,), "tar": (V,)}` (the ROC vertices).

    Returns:
        `{"tar@far=0.01": ..., ..., "roc_auc", "eer", "positive_pairs", "negative_pairs"}`
        (and the curve when asked). NaN rates when there are no positive or no negative
        pairs.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> m = verification_metrics(x, np.array([0, 0, 1, 1]), fars=(0.25,))
    >>> m["tar@far=0.25"], m["roc_auc"], m["eer"]
    (1.0, 1.0, 0.0)
    """
    x = normalized_rows(embeddings)
    labels = check_labels(labels, len(x))
    fars = tuple(float(f) for f in fars)
    if any(not 0 <= f <= 1 for f in fars):
        raise ValueError(f"Expected every FAR in [0, 1]. Received: fars={fars}")
    positives = positive_scores(x, labels, max_memory_bytes)
    unique = np.unique(positives)
    greater, greater_equal, num_negatives = count_negatives(
        x, labels, unique, max_memory_bytes=max_memory_bytes)
    result = {}
    if len(positives) == 0 or num_negatives == 0:
        result.update({f"tar@far={f:g}": float("nan") for f in fars})
        result.update(roc_auc=float("nan"), eer=float("nan"))
    else:
        # multiplicity of each distinct positive score
        counts = np.diff(np.append(np.searchsorted(positives, unique, side="left"),
                                   len(positives)))
        for f in fars:
            allowed = int(np.floor(f * num_negatives + 1e-9))
            result[f"tar@far={f:g}"] = float(counts[greater_equal <= allowed].sum()
                                             / len(positives))
        # AUC: each positive u beats the negatives below it, ties count half
        below = num_negatives - greater_equal
        ties = greater_equal - greater
        result["roc_auc"] = float(((below + 0.5 * ties) * counts).sum()
                                  / (len(positives) * num_negatives))
        far, tar, _ = roc_vertices(positives, greater, greater_equal, num_negatives)
        result["eer"] = equal_error_rate(far, tar)
        if return_curve:
            result["curve"] = {"far": far, "tar": tar}
    result.update(positive_pairs=int(len(positives)), negative_pairs=int(num_negatives))
    return result
