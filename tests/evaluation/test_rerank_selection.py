"""select_top_k: the re-ranking depth chosen on validation, against brute-force loops."""

import numpy as np
import pytest
import tensorflow as tf

from kdml.evaluation import retrieval_metrics
from kdml.evaluation.rerank import select_top_k
from tests.evaluation.test_rerank import _W, _weighted_product, brute_force_reranked_recall


def test_recall_per_depth_matches_brute_force_and_the_best_depth_wins():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(40, 6)).astype("float32")
    labels = rng.integers(0, 8, size=40)
    best, recalls = select_top_k(emb, labels, _weighted_product, candidates=(8, 1, 4, 2),
                                 pair_batch_size=7)
    assert list(recalls) == [1, 2, 4, 8]
    for depth, recall in recalls.items():
        expected = brute_force_reranked_recall(
            emb, labels, lambda a, b: float(np.sum(_W * a * b)), top_k=depth, ks=(1,))
        assert recall == pytest.approx(expected["reranked_recall@1"], abs=1e-12), depth
    # Depth 1 re-orders nothing: the embedding's own Recall@1.
    plain = retrieval_metrics(emb, labels, ks=(1,), nmi=False)["recall@1"]
    assert recalls[1] == pytest.approx(plain, abs=1e-6)  # plain is float32
    top = max(recalls.values())
    assert recalls[best] == top and best == min(d for d, r in recalls.items() if r == top)
    assert len(set(recalls.values())) > 1  # the depth matters here


def test_ties_go_to_the_smallest_depth_and_bad_depths_are_clear_errors():
    rng = np.random.default_rng(4)
    emb = rng.normal(size=(20, 5)).astype("float32")
    labels = rng.integers(0, 4, size=20)
    cosine = lambda a, b: tf.reduce_sum(a * b, -1)  # noqa: E731  re-ranking by cosine: no change
    best, recalls = select_top_k(emb, labels, cosine, candidates=(2, 4, 8))
    assert best == 2 and len(set(recalls.values())) == 1
    with pytest.raises(ValueError, match=r"candidates=\(4, 20\)"):
        select_top_k(emb, labels, cosine, candidates=(4, 20))
