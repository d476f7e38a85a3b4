"""`calibrate_threshold`: the cosine threshold of an open-set "no match", chosen on data.

A search answers its top-1 gallery item when the cosine similarity `s >= threshold`,
else "no match". On a labelled validation set, every item is a query against all the
others (leave-one-out; its top-1 is the most similar other item, ties to the lower
index). Over the Q queries, with `accept = s >= t` and `correct` = the top-1 shares the
query's label:

- `precision(t) = #{accept and correct} / #{accept}` (per-query top-1 match decisions;
  1 when nothing is accepted);
- `recall(t) = #{accept and correct} / #{queries with another item of their class}`;
- `far(t)`: over all impostor pairs `i < j` (different labels), the share with cosine
  `>= t` (`kdml.evaluation.verification`), so it does not depend on the gallery's size.

`target_precision=p`: the lowest threshold (the highest recall) among the queries'
top-1 similarities whose precision is at least p. `target_far=f`: the lowest threshold
with `far <= f`: just above the `(floor(f M) + 1)`-th highest impostor score (M pairs),
found in one blocked pass that keeps only those `floor(f M) + 1` highest scores.

Classes of one item are queries with no possible correct answer: the "unknowns" of a
validation set; include some to calibrate for open-set use.
"""

from __future__ import annotations

import numpy as np

from kdml.evaluation.verification import (check_labels, count_negatives, normalized_rows,
                                          upper_mask, upper_strips)


def leave_one_out_top1(x, labels, max_memory_bytes=256 * 2**20):
    """`(similarity (Q,), correct (Q,) bool)` of each item's most similar other item."""
    best = np.empty(len(x), np.float32)
    correct = np.empty(len(x), bool)
    for start, stop, strip in upper_strips(x, max_memory_bytes):
        strip[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argmax(strip, axis=1)
        best[start:stop] = strip[np.arange(stop - start), top]
        correct[start:stop] = labels[top] == labels[start:stop]
    return best, correct


def _highest_negatives(x, labels, count, max_memory_bytes):
    """The `count` highest impostor scores (descending) and the number M of impostor pairs."""
    kept = np.zeros(0, np.float32)
    total = 0
    for start, stop, strip in upper_strips(x, max_memory_bytes):
        keep = upper_mask(start, stop, len(x)) & (labels[start:stop, None] != labels[None, :])
        negatives = strip[keep]
        total += negatives.size
        kept = np.concatenate([kept, negatives])
        if len(kept) > count:
            kept = np.partition(kept, len(kept) - count)[len(kept) - count:]
    return np.sort(kept)[::-1], total


def decision_rates(similarity, correct, threshold):
    """`(precision, recall-numerator share, accepted)` of the top-1 decisions at `threshold`."""
    accept = similarity >= threshold
    hits = int((accept & correct).sum())
    return (hits / int(accept.sum()) if accept.any() else 1.0), hits, int(accept.sum())


def calibrate_threshold(embeddings, labels, *, target_precision=None, target_far=None,
                        max_memory_bytes=256 * 2**20) -> dict:
    """The cosine threshold meeting a precision or FAR target on a labelled set.

    Args:
        embeddings: `(N, d)` validation embeddings (L2-normalised here).
        labels: `(N,)` their classes.
        target_precision: in (0, 1]: top-1 precision of the accepted queries (module doc).
        target_far: in [0, 1): false accept rate over all impostor pairs.
        max_memory_bytes: budget of one `(B, N)` similarity strip.

    Returns:
        `{"threshold", "target": {"precision" | "far": value}, "precision", "recall",
        "far", "accepted", "queries", "known_queries", "negative_pairs"}`: the rates
        achieved on this set at `threshold` (accept when cosine `>= threshold`).

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.6, 0.8]])
    >>> t = calibrate_threshold(x, np.array([0, 0, 1, 2]), target_precision=1.0)
    >>> round(t["threshold"], 4), t["precision"], t["recall"]
    (0.9939, 1.0, 1.0)
    """
    if (target_precision is None) == (target_far is None):
        raise ValueError("Give exactly one of target_precision= (top-1 precision of the "
                         "accepted queries) or target_far= (false accept rate over impostor "
                         f"pairs). Received: target_precision={target_precision}, "
                         f"target_far={target_far}")
    x = normalized_rows(embeddings)
    labels = check_labels(labels, len(x))
    similarity, correct = leave_one_out_top1(x, labels, max_memory_bytes)
    _, class_of, class_size = np.unique(labels, return_inverse=True, return_counts=True)
    known = int((class_size[class_of] > 1).sum())
    if target_precision is not None:
        target_precision = float(target_precision)
        if not 0 < target_precision <= 1:
            raise ValueError(f"Expected target_precision in (0, 1]. Received: {target_precision}")
        order = np.argsort(-similarity, kind="stable")
        ranked, hits = similarity[order], np.cumsum(correct[order])
        # candidates: the last position of each distinct score (all of its ties accepted)
        last = np.append(np.flatnonzero(np.diff(ranked) != 0), len(ranked) - 1)
        precision = hits[last] / (last + 1)
        meets = np.flatnonzero(precision >= target_precision - 1e-12)
        if len(meets) == 0:
            raise ValueError(
                f"No threshold reaches precision {target_precision:g} on this data (the best "
                f"is {precision.max():.4f} at cosine >= {ranked[last[np.argmax(precision)]]:.4f})"
                ": lower target_precision, or calibrate on more (or better-separated) data.")
        threshold = float(ranked[last[meets[-1]]])
        target = {"precision": target_precision}
    else:
        target_far = float(target_far)
        if not 0 <= target_far < 1:
            raise ValueError(f"Expected target_far in [0, 1). Received: {target_far}")
        # impostor pairs i < j: all pairs minus those inside a class
        total = (len(x) ** 2 - int((class_size.astype(np.int64) ** 2).sum())) // 2
        allowed = int(np.floor(target_far * total + 1e-9))
        highest, _ = _highest_negatives(x, labels, allowed + 1, max_memory_bytes)
        if len(highest) <= allowed:  # every impostor pair may be accepted
            threshold = -1.0
        else:
            threshold = float(np.nextafter(highest[allowed], np.float32(np.inf)))
        target = {"far": target_far}
    greater, greater_equal, total = count_negatives(x, labels, [threshold],
                                                    max_memory_bytes=max_memory_bytes)
    precision, hits, accepted = decision_rates(similarity, correct, np.float32(threshold))
    return {"threshold": threshold, "target": target, "precision": float(precision),
            "recall": hits / known if known else float("nan"),
            "far": int(greater_equal[0]) / total if total else float("nan"),
            "accepted": accepted, "queries": int(len(x)), "known_queries": known,
            "negative_pairs": int(total)}
