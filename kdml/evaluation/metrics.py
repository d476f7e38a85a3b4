"""Retrieval and clustering metrics of the deep-metric-learning protocol (docs/design.md section 4).

Every query is ranked against the gallery by cosine similarity in one exact, blocked
product pass (`kdml.evaluation.ranking.retrieval_ranking`, ties broken by lower gallery
index). In the leave-one-out protocol (CUB, Cars, SOP) the queries are the gallery and a
query is never its own neighbour; in the query-vs-gallery protocol (In-Shop) the two
sets are given separately. From that pass, with R = the number of gallery items of the
query's class (the query itself not counted):

| metric | definition | computed by |
|---|---|---|
| `recall@K` | 1 when any of the K nearest shares the query's label (the DML Recall@K) | kdml: fewer than K negatives rank before the best positive (counted in the pass), every K at once |
| `precision@K` | fraction of the K nearest that share the label | tensorflow-similarity `PrecisionAtK` on the pass's top-K lists |
| `map@r` | Musgrave et al., ECCV 2020, sec. 3.2: `(1/R) sum_{i<=R} P@i rel_i` | tensorflow-similarity `MapAtK` on the top-`max R` lists (mask pre-clipped at R, see below) |
| `r_precision` | same paper: `#{same class among the R nearest} / R` | tensorflow-similarity `PrecisionAtK(r=R)` on the pre-clipped mask |
| `nmi`, `ami` | mutual information of the labels and a k-means clustering (k = number of classes) of the L2-normalised query embeddings, arithmetic normalisation; AMI corrects for chance | `kdml.evaluation.clustering.kmeans` (TensorFlow Lloyd), scikit-learn `normalized_mutual_info_score`, `adjusted_mutual_info_score` |

All values are averaged over queries ("micro" average). `nmi="auto"` (the default)
skips NMI, with a warning and the reason in the result's `.notes`, when its k-means
would cost more than twice the ranking pass (Stanford Online Products: 12,100 clusters).

Queries whose class has no other gallery item (R = 0) cannot be scored by MAP@R or
R-Precision. As in Musgrave et al.'s reference implementation (pytorch-metric-learning's
`AccuracyCalculator`, which masks such "lone" queries), they are left out of those two
averages, with a warning; when every query is lone both are NaN (undefined; that
library reports 0 there). They stay in Recall@K and Precision@K (the classic DML
protocol averages them over every query), where they always count as misses.

Note on `MapAtK`: with `clip_at_r=True` it loops over queries with `tf.map_fn`, which
runs eagerly (about 32 s for 10,000 queries on 2 CPU cores), and it cannot be wrapped in a
`tf.function` (its shape check raises while tracing). We instead zero the match mask
beyond each query's R, cut it to max R columns, and call it with `clip_at_r=False`: the
same sum `sum_{i<=R} P@i * rel_i / R`, vectorised (tested equal to `clip_at_r=True`).
`PrecisionAtK(r=R, clip_at_r=False)` on that mask is R-Precision, by the same argument.
"""

import math
import re
import warnings

import numpy as np
import tensorflow as tf

from kdml.evaluation import clustering
from kdml.evaluation.clustering import DEFAULT_MAX_ITER, kmeans
from kdml.evaluation.knn import _knn
from kdml.evaluation.ranking import retrieval_ranking

_KMEANS_N_INIT = 1
_PERCENT_PREFIXES = ("recall", "map", "precision", "r_precision", "nmi", "ami", "accuracy",
                     "ci95", "reranked", "tar@far", "roc_auc", "eer", "mrr", "ndcg")
# NMI runs by default ("auto") while k-means (`max_iter` passes of N x C products) costs
# at most this many times the ranking pass (N x M products), or is small anyway.
_AUTO_NMI_COST_RATIO = 2.0
_AUTO_NMI_SMALL = 2**25  # iterations x points x clusters: well under a second


class RetrievalMetrics(dict):
    """`{metric name: float}`, plus `notes`: `{metric name: str}` for what needs saying
    (the k-means settings behind `nmi`, or why it was skipped)."""

    def __init__(self, *args, notes=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = dict(notes or {})


def retrieval_metrics(
    embeddings,
    labels,
    ks=(1, 2, 4, 8),
    nmi="auto",
    seed=0,
    max_memory_bytes=256 * 2**20,
    *,
    gallery=None,
    gallery_labels=None,
    exclude_self=None,
    precision_ks=(),
    ami=False,
    n_init=_KMEANS_N_INIT,
    kmeans_max_iter=DEFAULT_MAX_ITER,
    knn_precision="float32",
    strategy=None,
    full_ranking=False,
    ndcg_ks=(),
):
    """Recall@K, Precision@K, MAP@R, R-Precision, NMI and AMI from one product pass.

    One pass (`kdml.evaluation.ranking.retrieval_ranking`) gives each query the rank of
    its first positive (Recall@K for every K) and its `k = max(max R, max(precision_ks))`
    nearest neighbours (MAP@R, R-Precision, Precision@K); see the module docstring for
    the definitions. Two protocols:

    - leave-one-out (`gallery=None`, CUB / Cars / SOP): every embedding is a query
      against all the others; R = size of the query's class minus one.
    - query vs gallery (`gallery=`, `gallery_labels=`; In-Shop): R = number of gallery
      items of the query's class. With `exclude_self=True` (query i is gallery item i,
      the same set passed twice) it is leave-one-out again. `None` (default) decides
      by value: `True` when the two sets are element-wise identical.

    Args:
        embeddings: `(N, d)` floating-point array (or tensor) of the queries;
            L2-normalised here.
        labels: `(N,)` integer class labels of the queries.
        ks: the K of Recall@K, each an integer with `1 <= K <` gallery size (minus one
            for leave-one-out).
        nmi: `"auto"` (default): report `nmi` when its k-means costs at most 2x the
            ranking pass (`(kmeans_max_iter + 1) x classes <= 2 x gallery size`: CUB,
            Cars; not SOP) or is small (`(kmeans_max_iter + 1) x N x classes <= 2**25`), else
            report NaN with a warning and the reason in `.notes["nmi"]`; `True`:
            always; `False`: never.
        seed: seed of the k-means initialisation, so `nmi`/`ami` are deterministic.
        max_memory_bytes: memory budget of the product strips (see `retrieval_ranking`).
        gallery: optional `(M, d)` gallery embeddings (query-vs-gallery protocol).
        gallery_labels: `(M,)` integer labels of `gallery`.
        exclude_self: see above.
        precision_ks: the K of Precision@K (fraction of the K nearest in the class).
        ami: whether to report `ami` (adjusted mutual information of the same k-means
            clustering); `"auto"` follows the `nmi` rule.
        n_init: k-means restarts (the lowest inertia is kept).
        kmeans_max_iter: Lloyd iterations per k-means run at most (default 10).
        knn_precision: `"float32"` (exact, one pass) or `"bfloat16"` (neighbour lists
            from `exact_knn`'s bfloat16 pass, `k = max(ks)`).
        strategy: optional `tf.distribute.Strategy` to shard the queries over.
        full_ranking: also `"mrr"`, `"map"` (average precision over the whole ranking)
            and `"ndcg@K"` for each K of `ndcg_ks`, from the same pass (float32 only).
        ndcg_ks: the K of NDCG@K (with `full_ranking=True`).

    Returns:
        A `RetrievalMetrics` dict of Python floats in [0, 1]: `"recall@K"` for each K,
        `"precision@K"` for each K of `precision_ks`, `"map@r"`, `"r_precision"` and,
        when asked, `"nmi"` and `"ami"` (AMI can be slightly negative), in that order;
        its `.notes` say how `nmi` was computed or why it was skipped.

    Example:

    >>> x = np.array([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    >>> m = retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1,), nmi=False)
    >>> round(m["recall@1"], 3), round(m["map@r"], 3)
    (1.0, 1.0)
    """
    embeddings, labels = _validate_set(embeddings, labels, "embeddings", "labels")
    for name, value in (("nmi", nmi), ("ami", ami)):
        if not (isinstance(value, (bool, np.bool_)) or value == "auto"):
            raise ValueError(f"Expected `{name}` to be True, False or 'auto'. "
                             f"Received: {name}={value!r}")
    if gallery is None:
        if gallery_labels is not None:
            raise ValueError("`gallery_labels` was given without `gallery`. Pass both or neither.")
        gallery_matrix, gallery_label_array = embeddings, labels
        exclude_self = True if exclude_self is None else bool(exclude_self)
        if not exclude_self:
            raise ValueError(
                "Leave-one-out (gallery=None) always excludes the query itself. "
                "Received: exclude_self=False")
    else:
        if gallery_labels is None:
            raise ValueError("`gallery` needs `gallery_labels` (one label per gallery row).")
        gallery_matrix, gallery_label_array = _validate_set(
            gallery, gallery_labels, "gallery", "gallery_labels")
        if gallery_matrix.shape[1] != embeddings.shape[1]:
            raise ValueError(
                "Expected queries and gallery of the same embedding dimension. Received: "
                f"embeddings.shape={embeddings.shape}, gallery.shape={gallery_matrix.shape}")
        if exclude_self is None:
            exclude_self = (gallery_matrix.shape == embeddings.shape
                            and np.array_equal(gallery_matrix, embeddings)
                            and np.array_equal(gallery_label_array, labels))
        exclude_self = bool(exclude_self)
        if exclude_self and (gallery_matrix.shape != embeddings.shape
                             or not np.array_equal(gallery_label_array, labels)):
            raise ValueError(
                "`exclude_self=True` needs query i to be gallery item i: the same rows and "
                f"labels. Received: embeddings.shape={embeddings.shape}, "
                f"gallery.shape={gallery_matrix.shape}.")
    num_gallery = gallery_matrix.shape[0]
    limit = num_gallery - 1 if exclude_self else num_gallery
    if limit < 1:
        raise ValueError(
            "Expected at least 2 embeddings for leave-one-out retrieval. "
            f"Received: N={num_gallery}")
    ks = _validate_ks(ks, limit, "ks", allow_empty=False)
    precision_ks = _validate_ks(precision_ks, limit, "precision_ks", allow_empty=True)
    if knn_precision not in ("float32", "bfloat16"):
        raise ValueError("Expected `knn_precision` to be 'float32' or 'bfloat16'. "
                         f"Received: knn_precision={knn_precision!r}")
    # Imported here: importing tensorflow_similarity takes seconds.
    from tensorflow_similarity.retrieval_metrics import MapAtK, PrecisionAtK

    gallery_classes, gallery_counts = np.unique(gallery_label_array, return_counts=True)
    count_of = dict(zip(gallery_classes.tolist(), gallery_counts.tolist()))
    # R: gallery items of the query's class, the query itself not counted
    r_of_class = {int(c): int(count_of.get(int(c), 0)) - int(exclude_self)
                  for c in np.unique(labels)}
    r_per_query = np.array([r_of_class[int(c)] for c in labels], dtype=np.int64)
    max_r = int(r_per_query.max())
    num_neighbours = int(max(max(precision_ks, default=0), min(max(max_r, 0), limit)))
    gallery_argument = None if gallery is None else gallery_matrix
    if full_ranking and knn_precision != "float32":
        raise ValueError("full_ranking (MRR, mAP, NDCG) comes from the exact float32 pass: "
                         "use knn_precision='float32'.")
    if knn_precision == "float32":
        ranking = retrieval_ranking(
            embeddings, labels, gallery_argument,
            None if gallery is None else gallery_label_array, top_k=num_neighbours,
            exclude_self=exclude_self, max_memory_bytes=max_memory_bytes, strategy=strategy,
            full_ranking=full_ranking, ndcg_ks=tuple(ndcg_ks) if full_ranking else ())
        first_rank, neighbours = ranking.first_positive_rank, ranking.top_k
        first_rank = np.where(first_rank < 0, np.iinfo(np.int64).max, first_rank)
    else:  # neighbour lists long enough for every K
        num_neighbours = max(num_neighbours, max(ks))
        neighbours, _ = _knn(
            embeddings, gallery_argument, k=num_neighbours, max_memory_bytes=max_memory_bytes,
            exclude_self=exclude_self, precision=knn_precision, strategy=strategy,
            return_similarities=False)
        matches = gallery_label_array[neighbours] == labels[:, None]
        first_rank = np.where(matches.any(axis=1), matches.argmax(axis=1),
                              np.iinfo(np.int64).max)
    match_mask = (gallery_label_array[neighbours] == labels[:, None] if num_neighbours
                  else np.zeros((len(labels), 0), bool))  # (N, num_neighbours)
    del neighbours

    results = RetrievalMetrics()
    for k in ks:
        # hit at K iff fewer than K items rank before the first positive
        results[f"recall@{k}"] = float(np.count_nonzero(first_rank < k) / len(labels))
    query_labels, match_tensor = tf.constant(labels), tf.constant(match_mask)
    for k in precision_ks:
        precision = PrecisionAtK(k=k).compute(query_labels=query_labels,
                                              match_mask=match_tensor[:, :k])
        results[f"precision@{k}"] = float(precision)

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
        width = min(max_r, num_neighbours)
        within_r = np.arange(width)[None, :] < r_scored[:, None]
        clipped_mask = tf.constant(match_mask[scored, :width] & within_r)
        scored_labels = tf.constant(labels[scored])
        r_positive = {c: r for c, r in r_of_class.items() if r > 0}
        map_at_r = MapAtK(r=r_positive, clip_at_r=False, k=width).compute(
            query_labels=scored_labels, match_mask=clipped_mask)
        # R-Precision: PrecisionAtK's sum over the first k matches divided by r[label];
        # with the mask zeroed beyond R that is #{same class among the R nearest} / R.
        r_precision = PrecisionAtK(r=r_positive, clip_at_r=False, k=width).compute(
            query_labels=scored_labels, match_mask=clipped_mask)
        results["map@r"] = float(map_at_r)
        results["r_precision"] = float(r_precision)
    else:
        results["map@r"] = math.nan
        results["r_precision"] = math.nan
    if full_ranking:
        # MRR: 1 / (rank of the first positive), 0 without one; mAP, NDCG: over queries
        # with positives (as map@r)
        found = first_rank < np.iinfo(np.int64).max
        results["mrr"] = float(np.where(found, 1.0 / (first_rank.astype(np.float64) + 1.0),
                                        0.0).mean())
        has = ~np.isnan(ranking.average_precision)
        results["map"] = float(ranking.average_precision[has].mean()) if has.any() else math.nan
        for i, k in enumerate(ndcg_ks):
            results[f"ndcg@{k}"] = (float(ranking.ndcg[has, i].mean()) if has.any()
                                    else math.nan)

    classes, class_of_item = np.unique(labels, return_inverse=True)
    wanted = [name for name, flag in (("nmi", nmi), ("ami", ami)) if flag is not False]
    if wanted:
        automatic = [name for name, flag in (("nmi", nmi), ("ami", ami)) if flag == "auto"]
        # (max_iter + 1) assignment passes of N x C products against N x M for ranking
        cost_ratio = (kmeans_max_iter + 1) * len(classes) / num_gallery
        small = (kmeans_max_iter + 1) * len(labels) * len(classes) <= _AUTO_NMI_SMALL
        skip = automatic if cost_ratio > _AUTO_NMI_COST_RATIO and not small else []
        run = [name for name in wanted if name not in skip]
        if run:
            scores, settings = kmeans_scores(
                embeddings, class_of_item, len(classes), seed=seed, n_init=n_init,
                max_iter=kmeans_max_iter, nmi="nmi" in run, ami="ami" in run,
                max_memory_bytes=max_memory_bytes, return_settings=True)
            results.update(scores)
            for name in run:
                results.notes[name] = settings
        if skip:
            reason = (
                f"skipped: k-means with {len(classes):,} clusters x {kmeans_max_iter} + 1 "
                f"iterations would cost {cost_ratio:.1f}x the ranking pass over "
                f"{num_gallery:,} items (the 'auto' limit is {_AUTO_NMI_COST_RATIO:g}x); "
                "pass nmi=True (ami=True) to compute it")
            for name in skip:
                results[name] = math.nan
                results.notes[name] = reason
            warnings.warn(f"{' and '.join(skip)} {reason}.", stacklevel=2)
    return results


def kmeans_scores(embeddings, labels, num_clusters, *, seed=0, n_init=_KMEANS_N_INIT,
                  max_iter=DEFAULT_MAX_ITER, nmi=True, ami=False, max_memory_bytes=256 * 2**20,
                  return_settings=False):
    """NMI / AMI between `labels` and a k-means clustering of the L2-normalised rows.

    `kdml.evaluation.clustering.kmeans` (TensorFlow Lloyd iterations; k-means++ seeding
    for small problems, seeded random rows otherwise; `max_iter` iterations at most,
    `n_init` restarts, `seed`) with `k = num_clusters`, then scikit-learn's
    `normalized_mutual_info_score` / `adjusted_mutual_info_score` (arithmetic-mean
    normalisation). Returns `{"nmi": float, "ami": float}` (those asked for) and, with
    `return_settings=True`, also a one-line description of the k-means run.
    """
    from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

    for name, value in (("n_init", n_init), ("kmeans_max_iter", max_iter)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"Expected `{name}` to be a positive integer. Received: {value!r}")
    clusters, _, inertia, iterations = kmeans(
        embeddings, int(num_clusters), seed=seed, n_init=int(n_init), max_iter=int(max_iter),
        max_memory_bytes=max_memory_bytes)
    scores = {}
    if nmi:
        scores["nmi"] = float(normalized_mutual_info_score(labels, clusters))
    if ami:
        scores["ami"] = float(adjusted_mutual_info_score(labels, clusters))
    if not return_settings:
        return scores
    init = ("k-means++" if num_clusters * len(embeddings) <= clustering._PLUSPLUS_LIMIT
            else "random rows")
    settings = (f"k-means (TensorFlow Lloyd): {int(num_clusters):,} clusters, {init} init, "
                f"seed {seed}, {int(n_init)} restart(s), at most {int(max_iter)} iterations "
                f"(best run: {iterations}), inertia {inertia:.6g}")
    return scores, settings


def format_metrics_table(rows):
    """Markdown table of named metric dicts, one row per result, one column per metric.

    Args:
        rows: `{row_name: {metric_name: value}}`, e.g. `{"initial": {...}, "final":
            {...}}`. Columns come in one fixed order whatever the dicts' key order:
            recall@K, precision@K (increasing K), map@r, r_precision, nmi, ami,
            reranked_recall@K, accuracy, ci95, then any other metric by name; a metric
            missing from a row shows `-`, a NaN shows `n/a`.

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
    columns = sorted({name for metrics in rows.values() for name in metrics},
                     key=metric_column_key)
    lines = [
        "| result | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row_name, metrics in rows.items():
        cells = [_format_value(name, metrics.get(name)) for name in columns]
        lines.append(f"| {row_name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# Column order of every metrics table: family, then K, then name.
_COLUMN_FAMILIES = ("recall@", "precision@", "map@r", "r_precision", "mrr", "map", "ndcg@",
                    "nmi", "ami", "reranked_recall@", "accuracy", "ci95")


def metric_column_key(name):
    """Sort key of a metric name in result tables (see `format_metrics_table`)."""
    match = re.fullmatch(r"(.*@)(\d+)", name)
    stem, k = (match.group(1), int(match.group(2))) if match else (name, 0)
    family = _COLUMN_FAMILIES.index(stem) if stem in _COLUMN_FAMILIES else len(_COLUMN_FAMILIES)
    return family, k, name


def _format_value(name, value):
    if value is None:
        return "-"
    value = float(value)
    if math.isnan(value):
        return "n/a"
    if name.lower().startswith(_PERCENT_PREFIXES):
        return f"{100.0 * value:.2f}"
    return f"{value:.4g}"


def _validate_set(embeddings, labels, embeddings_name, labels_name):
    embeddings = np.asarray(embeddings)
    labels = np.asarray(labels)
    if not np.issubdtype(embeddings.dtype, np.floating):
        raise ValueError(
            f"Expected `{embeddings_name}` to be a floating-point array; cast it with "
            f"`.astype('float32')`. Received: dtype={embeddings.dtype}"
        )
    if embeddings.ndim != 2:
        raise ValueError(
            f"Expected `{embeddings_name}` to be 2-D (num_items, dim). "
            f"Received: shape={embeddings.shape}"
        )
    if not np.all(np.isfinite(embeddings)):
        raise ValueError(
            f"Expected `{embeddings_name}` to be finite. Received: "
            f"{int(np.size(embeddings) - np.count_nonzero(np.isfinite(embeddings)))} "
            "NaN or infinite values."
        )
    if labels.ndim != 1 or labels.dtype == bool or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"Expected `{labels_name}` to be a 1-D integer array. "
            f"Received: shape={labels.shape}, dtype={labels.dtype}"
        )
    if labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"Expected one label per embedding. Received: {embeddings_name}.shape="
            f"{embeddings.shape}, {labels_name}.shape={labels.shape}"
        )
    if embeddings.shape[0] == 0:
        raise ValueError(f"Expected `{embeddings_name}` to be non-empty. Received: N=0")
    return embeddings.astype(np.float32, copy=False), labels.astype(np.int64)


def _validate_ks(ks, limit, name, allow_empty):
    if isinstance(ks, (int, np.integer)):
        ks = (ks,)
    ks = tuple(dict.fromkeys(ks))
    if not ks and not allow_empty:
        raise ValueError(f"Expected at least one K in `{name}`. Received: {name}=()")
    for k in ks:
        is_integer = isinstance(k, (int, np.integer)) and not isinstance(k, bool)
        if not is_integer or not 1 <= k <= limit:
            raise ValueError(
                f"Expected every K in `{name}` to be an integer with 1 <= K < N = {limit + 1} "
                f"(the query is not its own neighbour), or K <= gallery size. "
                f"Received: {name}={ks}"
            )
    return tuple(int(k) for k in ks)
