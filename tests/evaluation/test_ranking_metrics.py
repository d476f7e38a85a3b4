"""MRR, mAP over the whole ranking and NDCG@K from the one-pass engine, against a NumPy
stable-sort reference (exact ties) and scikit-learn (`label_ranking_average_precision_score`,
`ndcg_score`; untied data, where their tie rules do not matter)."""

import numpy as np
import pytest
from sklearn.metrics import label_ranking_average_precision_score, ndcg_score

from kdml.evaluation import retrieval_metrics, retrieval_ranking


def _reference(queries, query_labels, gallery, gallery_labels, exclude_self, ks):
    """Per query: AP, NDCG@K (NaN without positives), reciprocal rank (0 without)."""
    sims = np.asarray(queries, np.float64) @ np.asarray(gallery, np.float64).T
    if exclude_self:
        np.fill_diagonal(sims, -np.inf)
    order = np.argsort(-sims, axis=1, kind="stable")[:, : len(gallery) - int(exclude_self)]
    relevant = gallery_labels[order] == query_labels[:, None]
    ap, rr, ndcg = [], [], []
    for rel in relevant:
        positions = np.flatnonzero(rel)
        rr.append(1.0 / (positions[0] + 1) if len(positions) else 0.0)
        if not len(positions):
            ap.append(np.nan)
            ndcg.append([np.nan] * len(ks))
            continue
        ap.append(np.mean(np.arange(1, len(positions) + 1) / (positions + 1)))
        row = []
        for k in ks:
            dcg = sum(1 / np.log2(p + 2) for p in positions if p < k)
            ideal = sum(1 / np.log2(i + 2) for i in range(min(k, len(positions))))
            row.append(dcg / ideal)
        ndcg.append(row)
    return np.array(ap), np.array(ndcg), np.array(rr)


@pytest.mark.parametrize("budget", [3 * 4 * 64, 2**30])  # 3 rows a block, all rows
def test_leave_one_out_with_ties_equals_the_numpy_reference(budget):
    rng = np.random.default_rng(0)
    x = rng.integers(-2, 3, size=(61, 3)).astype(np.float32)  # exact products: many ties
    labels = rng.integers(0, 15, size=61)
    got = retrieval_ranking(x, labels, top_k=0, similarity="inner_product",
                            max_memory_bytes=budget, full_ranking=True, ndcg_ks=(1, 5, 100))
    ap, ndcg, _ = _reference(x, labels, x, labels, True, (1, 5, 100))
    np.testing.assert_allclose(got.average_precision, ap, rtol=1e-12)
    np.testing.assert_allclose(got.ndcg, ndcg, rtol=1e-12)
    assert np.isnan(ap).any() and np.nanmin(ap) < 0.5  # lone queries; not all easy


def test_query_vs_gallery_equals_the_numpy_reference():
    rng = np.random.default_rng(1)
    queries = rng.integers(-2, 3, size=(23, 3)).astype(np.float32)
    gallery = rng.integers(-2, 3, size=(47, 3)).astype(np.float32)
    query_labels, gallery_labels = rng.integers(0, 12, 23), rng.integers(0, 10, 47)
    got = retrieval_ranking(queries, query_labels, gallery, gallery_labels, top_k=4,
                            similarity="inner_product", max_memory_bytes=4 * 4 * 48,
                            full_ranking=True, ndcg_ks=(3,))
    ap, ndcg, _ = _reference(queries, query_labels, gallery, gallery_labels, False, (3,))
    np.testing.assert_allclose(got.average_precision, ap, rtol=1e-12)
    np.testing.assert_allclose(got.ndcg, ndcg, rtol=1e-12)


def test_metrics_equal_scikit_learn_on_untied_data():
    rng = np.random.default_rng(2)
    labels = rng.integers(0, 12, size=90)
    x = rng.normal(size=(12, 8))[labels] + rng.normal(size=(90, 8))
    labels[0] = 99  # a lone query
    got = retrieval_metrics(x, labels, ks=(1,), nmi=False, full_ranking=True, ndcg_ks=(5, 20))
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = unit @ unit.T
    off = ~np.eye(90, dtype=bool)
    y_score = scores[off].reshape(90, 89)                     # the query itself left out
    y_true = (labels[:, None] == labels[None, :])[off].reshape(90, 89)
    has = y_true.any(axis=1)
    assert not has.all()  # a lone query: left out of map and ndcg, 0 in mrr
    assert got["map"] == pytest.approx(
        label_ranking_average_precision_score(y_true[has], y_score[has]), abs=1e-9)
    for k in (5, 20):
        assert got[f"ndcg@{k}"] == pytest.approx(
            ndcg_score(y_true[has], y_score[has], k=k), abs=1e-9)
    _, _, rr = _reference(unit, labels, unit, labels, True, ())
    assert got["mrr"] == pytest.approx(rr.mean(), abs=1e-12)
    assert got["recall@1"] <= got["mrr"] <= 1


def test_errors():
    x = np.eye(4, dtype=np.float32)
    with pytest.raises(ValueError, match="needs `full_ranking=True`"):
        retrieval_ranking(x, np.arange(4), ndcg_ks=(3,))
    with pytest.raises(ValueError, match="exact float32 pass"):
        retrieval_metrics(x, np.array([0, 0, 1, 1]), ks=(1,), nmi=False, full_ranking=True,
                          knn_precision="bfloat16")
