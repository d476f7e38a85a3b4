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

`gallery=`: the same N items as the search scores them on the gallery side (e.g. a
quantized search model: queries through its `.tflite` embedder, gallery rows encoded in
float16 or int8). Query `i` is then scored against rows `j != i` of `gallery`, and the
FAR counts the ordered impostor pairs `(i, j)`, `i != j` (the scores are no longer
symmetric).

Two results make a threshold meaningless, and `calibrate_threshold` warns of both (one
`warning:` line, `threshold_warnings`):

- it accepts under `MIN_ACCEPTANCE` (5 %) of the calibration queries: nearly every query,
  correct ones included, would come back "no match";
- it lies within `QUANTIZATION_COSINE_ERROR` of 1.0: the cosine an exact duplicate of a
  gallery image loses in a quantized search model is about that large, so the duplicate
  itself would be refused there. The bound, `2e-3`, adds up the error sources of
  `kdml.export.search` (docs/export.md): a float16 gallery rounds each component to
  `2^-11` relative, so `|q . (g - g16)| <= 2^-11 |g| ~ 4.9e-4` for unit `q`, `g`; an int8
  embedder's output is rounded to steps of `1/128`, which costs a unit vector
  `1 - cos ~ |e|^2 / 2 = d / (24 * 128^2)` on average (3.3e-4 at d = 128) before its int8
  weights add theirs: an exact duplicate scored 0.9987 (`1.3e-3` lost) through a 128-d
  int8 search model. The export re-checks the threshold on each search model against the
  same calibration data (`kdml.export.search.check_search_threshold`).
"""

from __future__ import annotations

import warnings

import numpy as np

from kdml.evaluation.verification import (check_labels, normalized_rows, strip_rows,
                                          upper_mask)

MIN_ACCEPTANCE = 0.05
QUANTIZATION_COSINE_ERROR = 2e-3


def _strips(x, gallery, max_memory_bytes):
    """Yields `(start, stop, strip)`: `strip = x[start:stop] @ gallery.T` (`gallery`
    None: `x` itself), `(B, N)` float32."""
    rows = strip_rows(len(x), max_memory_bytes)
    other = x if gallery is None else gallery
    for start in range(0, len(x), rows):
        stop = min(start + rows, len(x))
        yield start, stop, x[start:stop] @ other.T


def _impostors(start, stop, labels, symmetric):
    """`(B, N)` bool: the strip's impostor pairs (`j > i` only when the scores are symmetric)."""
    mask = labels[start:stop, None] != labels[None, :]
    return mask & upper_mask(start, stop, len(labels)) if symmetric else mask


def leave_one_out_top1(x, labels, max_memory_bytes=256 * 2**20, gallery=None):
    """`(similarity (Q,), correct (Q,) bool)` of each item's most similar other item
    (scored against `gallery`'s rows of the same items when given)."""
    best = np.empty(len(x), np.float32)
    correct = np.empty(len(x), bool)
    for start, stop, strip in _strips(x, gallery, max_memory_bytes):
        strip[np.arange(stop - start), np.arange(start, stop)] = -np.inf
        top = np.argmax(strip, axis=1)
        best[start:stop] = strip[np.arange(stop - start), top]
        correct[start:stop] = labels[top] == labels[start:stop]
    return best, correct


def _highest_negatives(x, labels, count, max_memory_bytes, gallery=None):
    """The `count` highest impostor scores (descending) and the number M of impostor pairs."""
    kept = np.zeros(0, np.float32)
    total = 0
    for start, stop, strip in _strips(x, gallery, max_memory_bytes):
        negatives = strip[_impostors(start, stop, labels, gallery is None)]
        total += negatives.size
        kept = np.concatenate([kept, negatives])
        if len(kept) > count:
            kept = np.partition(kept, len(kept) - count)[len(kept) - count:]
    return np.sort(kept)[::-1], total


def _negatives_at_or_above(x, labels, threshold, max_memory_bytes, gallery=None) -> int:
    """How many impostor pairs score `>= threshold` (float32 comparison)."""
    threshold = np.float32(threshold)
    return int(sum((strip[_impostors(start, stop, labels, gallery is None)] >= threshold).sum()
                   for start, stop, strip in _strips(x, gallery, max_memory_bytes)))


def threshold_warnings(calibration: dict) -> list:
    """The reasons a `calibrate_threshold` result is not a useful threshold (module
    docstring): `[]`, or short sentences (accepts too few queries; too close to 1.0)."""
    reasons = []
    acceptance = calibration["accepted"] / max(calibration["queries"], 1)
    if acceptance < MIN_ACCEPTANCE:
        reasons.append(f"it accepts {calibration['accepted']:,} of {calibration['queries']:,} "
                       f"calibration queries ({100 * acceptance:.2f} % < "
                       f"{100 * MIN_ACCEPTANCE:g} %), so nearly every search answers no match")
    if 1.0 - calibration["threshold"] < QUANTIZATION_COSINE_ERROR:
        reasons.append(f"cosine {calibration['threshold']:.6f} is within "
                       f"{QUANTIZATION_COSINE_ERROR:g} of 1.0 (the cosine an exact duplicate "
                       "loses in a quantized search model), so quantized models refuse "
                       "duplicates")
    return reasons


def threshold_warning_line(calibration: dict, source: str = "the calibration set") -> str:
    """One line of `threshold_warnings`, with the fix; "" when there is nothing to say."""
    reasons = threshold_warnings(calibration)
    if not reasons:
        return ""
    return (f"the threshold calibrated on {source} means little: {'; and '.join(reasons)}. "
            "Calibrate on data like the queries (classes shared with the gallery, and some "
            "unknowns), or relax --target_precision / --target_far.")


def decision_rates(similarity, correct, threshold):
    """`(precision, recall-numerator share, accepted)` of the top-1 decisions at `threshold`."""
    accept = similarity >= threshold
    hits = int((accept & correct).sum())
    return (hits / int(accept.sum()) if accept.any() else 1.0), hits, int(accept.sum())


def calibrate_threshold(embeddings, labels, *, target_precision=None, target_far=None,
                        max_memory_bytes=256 * 2**20, gallery=None, warn: bool = True,
                        source: str = "the calibration set") -> dict:
    """The cosine threshold meeting a precision or FAR target on a labelled set.

    Args:
        embeddings: `(N, d)` validation embeddings (L2-normalised here).
        labels: `(N,)` their classes.
        target_precision: in (0, 1]: top-1 precision of the accepted queries (module doc).
        target_far: in [0, 1): false accept rate over all impostor pairs.
        max_memory_bytes: budget of one `(B, N)` similarity strip.
        gallery: optional `(N, d)`: the same items as the gallery side scores them
            (module docstring); default: `embeddings` (symmetric scores).
        warn: emit `threshold_warning_line` as a Python warning (one `warning:` line in
            a kdml command) when the threshold is degenerate.
        source: the data's name in that warning.

    Returns:
        `{"threshold", "target": {"precision" | "far": value}, "precision", "recall",
        "far", "accepted", "acceptance", "queries", "known_queries", "negative_pairs"}`:
        the rates achieved on this set at `threshold` (accept when cosine `>= threshold`;
        `acceptance = accepted / queries`).

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
    if gallery is not None:
        gallery = normalized_rows(gallery, "gallery")
        if gallery.shape != x.shape:
            raise ValueError(f"Expected the gallery rows of the same {x.shape} items. "
                             f"Received: gallery of shape {gallery.shape}")
    similarity, correct = leave_one_out_top1(x, labels, max_memory_bytes, gallery)
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
        # impostor pairs i < j (ordered pairs i != j with a gallery): all pairs minus
        # those inside a class
        total = (len(x) ** 2 - int((class_size.astype(np.int64) ** 2).sum()))
        total //= 2 if gallery is None else 1
        allowed = int(np.floor(target_far * total + 1e-9))
        highest, _ = _highest_negatives(x, labels, allowed + 1, max_memory_bytes, gallery)
        if len(highest) <= allowed:  # every impostor pair may be accepted
            threshold = -1.0
        else:
            threshold = float(np.nextafter(highest[allowed], np.float32(np.inf)))
        target = {"far": target_far}
    return rates_at(threshold, similarity, correct, x, labels, target=target, known=known,
                    max_memory_bytes=max_memory_bytes, gallery=gallery, warn=warn,
                    source=source)


def rates_at(threshold, similarity, correct, x, labels, *, target, known,
             max_memory_bytes=256 * 2**20, gallery=None, warn=True,
             source="the calibration set") -> dict:
    """`calibrate_threshold`'s result at a given `threshold`: the rates of the top-1
    decisions `(similarity, correct)` of `leave_one_out_top1` and the FAR over the
    impostor pairs of `x` (and `gallery`)."""
    class_size = np.unique(labels, return_counts=True)[1].astype(np.int64)
    total = (len(x) ** 2 - int((class_size ** 2).sum())) // (2 if gallery is None else 1)
    at_or_above = _negatives_at_or_above(x, labels, threshold, max_memory_bytes, gallery)
    precision, hits, accepted = decision_rates(similarity, correct, np.float32(threshold))
    result = {"threshold": float(threshold), "target": target, "precision": float(precision),
              "recall": hits / known if known else float("nan"),
              "far": at_or_above / total if total else float("nan"),
              "accepted": accepted, "acceptance": accepted / len(x) if len(x) else 0.0,
              "queries": int(len(x)), "known_queries": known, "negative_pairs": int(total)}
    line = threshold_warning_line(result, source) if warn else ""
    if line:
        warnings.warn(line, stacklevel=3)
    return result
