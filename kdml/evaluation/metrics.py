"""Zero-shot retrieval metrics of the deep-metric-learning protocol (DESIGN.md section 4).

Every embedding is a query against all the others (leave-one-out: a query is never its
own neighbour), ranked by cosine similarity with one exact, chunked k-NN pass
(`kdml.evaluation.knn.exact_knn`, ties broken by lower index). From that ranking:

- `recall@K`: the DML Recall@K, 1 for a query when any of its K nearest neighbours
  shares its label, averaged over all queries. Computed by tensorflow-similarity's
  `retrieval_metrics.RecallAtK`.
- `map@r`: MAP@R of Musgrave et al., "A Metric Learning Reality Check" (ECCV 2020),
  section 3.2: with R = the number of other images of the query's class,
  `AP@R = (1/R) * sum_{i<=R} P@i * rel_i`, averaged over queries. Computed by
  tensorflow-similarity's `retrieval_metrics.MapAtK` (`r={label: R}`), see the note
  below.
- `r_precision`: R-Precision of the same paper, `(1/R) * #{same-class among the R
  nearest}`; computed here (tensorflow-similarity has no R-Precision).
- `nmi`: normalised mutual information (arithmetic mean normalisation) between the
  labels and a k-means clustering, with k = the number of classes, of the L2-normalised
  embeddings; scikit-learn's `KMeans` (k-means++, one initialisation, fixed `seed`) and
  `normalized_mutual_info_score`, computed here.

Queries whose class has no other image (R = 0) cannot be scored by MAP@R or
R-Precision. As in Musgrave et al.'s reference implementation (pytorch-metric-learning's
`AccuracyCalculator`, which masks such "lone" queries), they are left out of those two
averages, with a warning; when every query is lone both are NaN (undefined; that
library reports 0 there). They stay in Recall@K
(the classic DML protocol averages it over every query), where they always count as a
miss.

Note on `MapAtK`: with `clip_at_r=True` it loops over queries with `tf.map_fn`, which
runs eagerly (about 32 s for 10,000 queries on 2 CPU cores), and it cannot be wrapped in a
`tf.function` (its shape check raises while tracing). We instead zero the match mask
beyond each query's R and call it with `clip_at_r=False`: the same sum
`sum_{i<=R} P@i * rel_i / R`, vectorised (tested equal to `clip_at_r=True`).
"""

import math
import warnings

import numpy as np
import tensorflow as tf

from kdml.evaluation.knn import exact_knn

_KMEANS_N_INIT = 1
_PERCENT_PREFIXES = ("recall", "map", "precision", "r_precision", "nmi")


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    nmi=True,
    seed=0,
    max_memory_bytes=256 * 2**20,
):
    """Recall@K, MAP@R, R-Precision and NMI of a labelled embedding set.

    One leave-one-out k-NN pass with `k = max(max(ks), max R)` serves every ranking
    metric; see the module docstring for the definitions and where each is computed.

    Args:
        embeddings: `(N, d)` floating-point array (or tensor); L2-normalised here.
        labels: `(N,)` integer class labels.
        ks: the K of Recall@K, each an integer with `1 <= K < N`.
        nmi: whether to run k-means and report `nmi` (the slow part for many classes).
        seed: seed of the k-means initialisation, so `nmi` is deterministic.
        max_memory_bytes: memory budget of the k-NN similarity blocks (see
            `exact_knn`).

    Returns:
        A dict of Python floats in [0, 1]: `"recall@K"` for each K, `"map@r"`,
        `"r_precision"` and, when `nmi=True`, `"nmi"`.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> m = retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1,), nmi=False)
    >>> round(m["recall@1"], 3), round(m["map@r"], 3)
    (1.0, 1.0)
    """
    embeddings, labels, ks = _validate(embeddings, labels, ks)
    # Imported here: importing tensorflow_similarity takes seconds.
    from tensorflow_similarity.retrieval_metrics import MapAtK, RecallAtK

    classes, class_of_item, class_sizes = np.unique(
        labels, return_inverse=True, return_counts=True
    )
    r_per_query = class_sizes[class_of_item] - 1  # other images of the query's class
    num_neighbours = int(max(max(ks), r_per_query.max()))
    neighbours, _ = exact_knn(
        embeddings, k=num_neighbours, max_memory_bytes=max_memory_bytes, exclude_self=True
    )
    match_mask = labels[neighbours] == labels[:, None]  # (N, num_neighbours)

    query_labels, match_tensor = tf.constant(labels), tf.constant(match_mask)
    results = {}
    for k in ks:
        recall = RecallAtK(k=k).compute(query_labels=query_labels, match_mask=match_tensor)
        results[f"recall@{k}"] = float(recall)

    scored = r_per_query > 0
    if not scored.all():
        warnings.warn(
            f"{int((~scored).sum())} of {labels.size} queries have no other image of "
            "their class (R = 0); they are left out of map@r and r_precision "
            "(Musgrave et al.) and count as misses in recall@K.",
            stacklevel=2,
        )
    if scored.any():
        r_scored = r_per_query[scored]
        within_r = np.arange(num_neighbours)[None, :] < r_scored[:, None]
        clipped_mask = match_mask[scored] & within_r
        r_of_class = {
            int(label): int(size - 1)
            for label, size in zip(classes, class_sizes)
            if size > 1
        }
        map_at_r = MapAtK(r=r_of_class, clip_at_r=False, k=num_neighbours).compute(
            query_labels=tf.constant(labels[scored]), match_mask=tf.constant(clipped_mask)
        )
        results["map@r"] = float(map_at_r)
        results["r_precision"] = float(np.mean(clipped_mask.sum(axis=1) / r_scored))
    else:
        results["map@r"] = math.nan
        results["r_precision"] = math.nan

    if nmi:
        results["nmi"] = _kmeans_nmi(embeddings, class_of_item, len(classes), seed)
    return results


def format_metrics_table(rows):
    """Markdown table of named metric dicts, one row per result, one column per metric.

    Args:
        rows: `{row_name: {metric_name: value}}`, e.g. `{"initial": {...}, "final":
            {...}}`. Columns appear in first-seen order; a metric missing from a row
            shows `-`, a NaN shows `n/a`.

    Returns:
        The table as a string. Recall, MAP, precision and NMI values are printed in
        percent with 2 decimals (`0.6543 -> 65.43`); any other metric with `%.4g`.

    Example:

    >>> print(format_metrics_table({"final": {"recall@1": 0.6543, "nmi": 0.7}}))
    | result | recall@1 | nmi |
    |---|---:|---:|
    | final | 65.43 | 70.00 |
    """
    if not rows:
        raise ValueError("Expected at least one row of metrics. Received: rows={}")
    columns = []
    for metrics in rows.values():
        for name in metrics:
            if name not in columns:
                columns.append(name)
    lines = [
        "| result | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row_name, metrics in rows.items():
        cells = [_format_value(name, metrics.get(name)) for name in columns]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _format_value(name, value):
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if name.lower().startswith(_PERCENT_PREFIXES):
        return f"{100.0 * value:.2f}"
    return f"{value:.4g}"


def _kmeans_nmi(embeddings, class_of_item, num_classes, seed):
    """NMI between class indices and k-means (k = num_classes) on L2-normalised rows."""
    from sklearn.cluster import KMeans
    from sklearn.metrics import normalized_mutual_info_score
    from threadpoolctl import threadpool_limits

    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    normalised = embeddings / np.maximum(norms, 1e-12)
    kmeans = KMeans(n_clusters=num_classes, n_init=_KMEANS_N_INIT, random_state=seed)
    # scikit-learn already runs the Lloyd iterations with single-threaded BLAS (it
    # parallelises with OpenMP); the k-means++ initialisation does not, and its many
    # small multi-threaded GEMMs oversubscribe a busy CPU (10,000 x 128, 1,000 classes
    # on 2 shared cores: 103 s -> 10 s with this limit).
    with threadpool_limits(limits=1, user_api="blas"):
        clusters = kmeans.fit_predict(normalised)
    return float(normalized_mutual_info_score(class_of_item, clusters))


def _validate(embeddings, labels, ks):
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(
            "Expected `embeddings` to be a floating-point array; cast it with "
            f"`.astype('float32')`. Received: dtype={embeddings.dtype}"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            "Expected `embeddings` to be 2-D (num_items, dim). "
            f"Received: shape={embeddings.shape}"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(
            "Expected `embeddings` to be finite. Received: "
            f"{int(np.size(embeddings) - np.count_nonzero(np.isfinite(embeddings)))} "
            "NaN or infinite values."
        )
    if labels.ndim != 1 or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            "Expected `labels` to be a 1-D integer array. "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            "Expected one label per embedding. Received: "
            f"embeddings.shape={embeddings.shape}, labels.shape={labels.shape}"
        )
    num_items = embeddings.shape[0]
    if num_items < 2:
        raise ValueError(
            "Expected at least 2 embeddings for leave-one-out retrieval. "
            f"Received: N={num_items}"
        )
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(dict.fromkeys(ks))
    if not ks:
        raise ValueError("Expected at least one K in `ks`. Received: ks=()")
    for k in ks:
        is_integer = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
        if not is_integer or not 1 <= k < num_items:
            raise ValueError(
                f"Expected every K in `ks` to be an integer with 1 <= K < N = {num_items} "
                f"(the query is not its own neighbour). Received: ks={ks}"
            )
    ks = tuple(int(k) for k in ks)
    return embeddings.astype(np.float32, copy=False), labels.astype(np.int64), ks
