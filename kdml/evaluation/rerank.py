"""Re-ranking of each query's cosine top-k neighbours by a learned pair scorer (PDDM).

At test time the embedding does the retrieval (docs/design.md 3.4); a trained PDDM unit can
then re-order each query's `top_k` cosine neighbours by its score S(query, candidate),
as in Huang et al. (NIPS 2016) where the unit measures local similarity. Vectorised:
one exact k-NN pass gathers the candidates, and the q x top_k pairs are scored in
fixed-size batches (the last one zero-padded, so a `tf.function` scorer traces once).
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import tensorflow as tf

from kdml.evaluation.knn import exact_knn

__all__ = ["pair_scorer", "rerank_metrics", "reranked_neighbours", "select_top_k"]


def pair_scorer(model) -> Callable:
    """`scorer(a, b) -> (n,)` from a two-input Keras model such as `pddm.keras`.

    The model maps `[(n, d), (n, d)]` to `(n,)` scores (what a PDDM run saves); the
    scorer runs it in inference mode inside one `tf.function`.
    """

    @tf.function(reduce_retracing=True)
    def scorer(a, b):
        return model([a, b], training=False)

    return scorer


def reranked_neighbours(embeddings, scorer, *, top_k, pair_batch_size=8192,
                        max_memory_bytes=256 * 2**20):
    """Each query's `top_k` cosine neighbours (itself excluded), re-ordered by `scorer`.

    Args:
        embeddings: (N, d) float array; rows are L2-normalised before scoring, as the
            embedder's outputs that trained the unit are.
        scorer: `scorer(a, b) -> (n,)` scores of row pairs (a, b both (n, d)), higher
            = more similar, e.g. `kdml.layers.PDDM` or `pair_scorer(model)`.
        top_k: candidates per query, 1 <= top_k <= N - 1.
        pair_batch_size: (query, candidate) pairs per scorer call.
        max_memory_bytes: memory budget of the k-NN pass (see `exact_knn`).

    Returns:
        (N, top_k) int64 gallery indices in decreasing score; equal scores keep the
        cosine order.
    """
    indices, scores = _scored_candidates(embeddings, scorer, top_k, pair_batch_size,
                                         max_memory_bytes)
    return _order_by_score(indices, scores)


def _order_by_score(indices, scores):
    """Candidates (N, k) re-ordered by decreasing score; ties keep the cosine order."""
    order = np.argsort(-scores, axis=1, kind="stable")
    return np.take_along_axis(indices, order, axis=1)


def _scored_candidates(embeddings, scorer, top_k, pair_batch_size, max_memory_bytes):
    """Each query's cosine top-k (N, k) and their scorer scores (N, k) float32."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    if embeddings.ndim != 2:
        raise ValueError(
            f"Expected `embeddings` to be (N, d). Received: shape={embeddings.shape}")
    if not isinstance(pair_batch_size, (int, np.integer)) or pair_batch_size < 1:
        raise ValueError(
            f"Expected `pair_batch_size` >= 1. Received: pair_batch_size={pair_batch_size!r}")
    indices, _ = exact_knn(embeddings, k=top_k, max_memory_bytes=max_memory_bytes)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    unit_rows = embeddings / np.maximum(norms, 1e-12)
    num_queries = len(embeddings)
    queries = np.repeat(np.arange(num_queries), top_k)  # (N * top_k,)
    candidates = indices.reshape(-1)
    total = len(candidates)
    batch = int(min(pair_batch_size, total))
    scores = np.empty(total, dtype=np.float32)
    for start in range(0, total, batch):
        stop = min(start + batch, total)
        a = unit_rows[queries[start:stop]]
        b = unit_rows[candidates[start:stop]]
        if stop - start < batch:  # keep one traced shape
            pad = ((0, batch - (stop - start)), (0, 0))
            a, b = np.pad(a, pad), np.pad(b, pad)
        out = np.asarray(scorer(tf.constant(a), tf.constant(b)), dtype=np.float32)
        scores[start:stop] = out.reshape(-1)[: stop - start]
    return indices, scores.reshape(num_queries, top_k)


def rerank_metrics(embeddings, labels, scorer, *, top_k, ks=(1, 2, 4, 8), **kwargs) -> dict:
    """Recall@K after re-ranking each query's cosine top-`top_k` by `scorer`.

    Leave-one-out like `retrieval_metrics`: every image is a query against all the
    others. Recall@K is 1 for a query when one of its first K re-ranked candidates
    shares its label; queries with no other image of their class count as misses.

    Args:
        embeddings: (N, d) float array (the embedder's outputs).
        labels: (N,) integer labels.
        scorer: `scorer(a, b) -> (n,)`, see `reranked_neighbours`.
        top_k: candidates re-ranked per query (1 <= top_k <= N - 1).
        ks: Recall@K values; those above `top_k` are skipped (re-ranking cannot change
            them beyond the candidates).
        **kwargs: `pair_batch_size`, `max_memory_bytes` of `reranked_neighbours`.

    Returns:
        {"reranked_recall@K": float} for each K in `ks` with K <= top_k.
    """
    labels = np.asarray(labels).reshape(-1)
    if len(labels) != len(embeddings):
        raise ValueError(
            "Expected one label per embedding. Received: "
            f"{len(embeddings)} embeddings, {len(labels)} labels.")
    kept = sorted({int(k) for k in ks if int(k) <= top_k})
    if not kept:
        raise ValueError(
            f"No K in ks={tuple(ks)} is <= top_k={top_k}: nothing to report. Raise top_k.")
    order = reranked_neighbours(embeddings, scorer, top_k=top_k, **kwargs)
    hits = labels[order] == labels[:, None]  # (N, top_k)
    return {f"reranked_recall@{k}": float(np.mean(np.any(hits[:, :k], axis=1)))
            for k in kept}


def select_top_k(embeddings, labels, scorer, *, candidates=(1, 2, 4, 8, 16, 32), k=1,
                 pair_batch_size=8192, max_memory_bytes=256 * 2**20):
    """The re-ranking depth with the best reranked Recall@`k` on a VALIDATION split.

    Re-ranking is its own evaluation row; its depth is a hyperparameter, so it is
    chosen here on validation embeddings and then applied once to test. The pairs of
    the largest candidate are scored once; a smaller depth re-orders a prefix of them.
    `top_k = 1` (or any depth <= k) leaves Recall@k as the embedding's own.

    Args:
        embeddings: (N, d) validation embeddings; labels: (N,) their labels.
        scorer: `scorer(a, b) -> (n,)`, see `reranked_neighbours`.
        candidates: depths to try, each in [1, N - 1].
        k: the Recall@K that decides (default 1).
        pair_batch_size, max_memory_bytes: as `reranked_neighbours`.

    Returns:
        (best depth, {depth: reranked Recall@k}); ties go to the smallest depth.
    """
    labels = np.asarray(labels).reshape(-1)
    depths = sorted({int(c) for c in candidates})
    if not depths or depths[0] < 1 or depths[-1] > len(labels) - 1:
        raise ValueError(
            f"Expected `candidates` in [1, N - 1] = [1, {len(labels) - 1}]. "
            f"Received: candidates={tuple(candidates)}. Drop the depths beyond N - 1.")
    indices, scores = _scored_candidates(embeddings, scorer, depths[-1], pair_batch_size,
                                         max_memory_bytes)
    recalls = {}
    for depth in depths:
        order = _order_by_score(indices[:, :depth], scores[:, :depth])
        hits = labels[order[:, :k]] == labels[:, None]
        recalls[depth] = float(np.mean(np.any(hits, axis=1)))
    best = max(depths, key=lambda depth: (recalls[depth], -depth))
    return best, recalls
