"""How close an approximate search is to the exact one: recall@k and queries/s."""

from __future__ import annotations

import time
from typing import Optional

import numpy as np

from kdml.index.backends import ExactBackend, drop_query_rows, make_backend, sample_recall


def measure_approximation(index, queries: Optional[np.ndarray] = None, *, k: int = 10,
                          approximate: Optional[str] = None, num_queries: int = 1000,
                          seed: int = 0, backend_options: Optional[dict] = None) -> dict:
    """Recall@k of an approximate backend against exact search, and both throughputs.

    Args:
        index: a `GalleryIndex`.
        queries: `(Q, d)` query embeddings; None: a seeded sample of `num_queries`
            gallery rows, each query's own row removed from both result lists.
        approximate: the backend to measure; None: the index's own when it is not exact,
            else "faiss" built here over the index's vectors.

    Returns:
        `{"backend", "config", "k", "queries", "gallery", "recall_at_k", "exact_qps",
        "approximate_qps", "speedup", "build_s"}`; recall is the mean of
        |approximate top-k ∩ exact top-k| / k.
    """
    n = len(index)
    rows = None
    if queries is None:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(n, min(int(num_queries), n), replace=False))
        queries = index.embeddings[rows]
    queries = np.ascontiguousarray(queries, np.float32)
    k = min(int(k), n - (rows is not None))
    if k < 1:
        raise ValueError(f"measuring recall needs a gallery of at least 2 items. Received: {n}")
    search_k = k + (rows is not None)

    exact = ExactBackend()
    exact.build(index.embeddings)
    exact.search(queries[:8], search_k)  # trace once
    start = time.perf_counter()
    exact_found, _ = exact.search(queries, search_k)
    exact_s = time.perf_counter() - start

    build_s = 0.0
    if approximate is None and index.backend.name != "exact":
        searcher = index.backend
    else:
        name = approximate or "faiss"
        searcher = make_backend(name, **(backend_options or {}))
        start = time.perf_counter()
        searcher.build(index.embeddings, seed=seed)
        build_s = time.perf_counter() - start
    searcher.search(queries[:8], search_k)
    start = time.perf_counter()
    approximate_found, _ = searcher.search(queries, search_k)
    approximate_s = time.perf_counter() - start

    if rows is not None:
        exact_found, approximate_found = (drop_query_rows(exact_found, rows, k),
                                          drop_query_rows(approximate_found, rows, k))
    exact_qps, approximate_qps = len(queries) / exact_s, len(queries) / approximate_s
    return {"backend": searcher.name, "config": searcher.config(), "k": k,
            "queries": int(len(queries)), "gallery": int(n),
            "recall_at_k": sample_recall(approximate_found, exact_found, k),
            "exact_qps": exact_qps, "approximate_qps": approximate_qps,
            "speedup": approximate_qps / exact_qps, "build_s": build_s}
