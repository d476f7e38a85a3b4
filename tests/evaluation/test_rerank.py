"""rerank_metrics against a brute-force NumPy loop, invariances, a saved PDDM re-ranker."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from kdml.evaluation import rerank_metrics, retrieval_metrics
from kdml.evaluation.rerank import pair_scorer, reranked_neighbours
from kdml.layers.pddm import pddm_pair_model
from tests.layers.test_pddm import _randomised_unit


def brute_force_reranked_recall(emb, labels, score, top_k, ks):
    """Per query: sort the others by cosine (ties: lower index), keep top_k, re-sort by
    `score(a, b)` on the normalised rows (ties: cosine order), count hits."""
    unit = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    n = len(emb)
    hits = {k: 0 for k in ks}
    for q in range(n):
        others = [g for g in range(n) if g != q]
        by_cosine = sorted(others, key=lambda g: (-float(unit[q] @ unit[g]), g))[:top_k]
        reranked = sorted(range(top_k), key=lambda r: (-score(unit[q], unit[by_cosine[r]]), r))
        reranked = [by_cosine[r] for r in reranked]
        for k in ks:
            hits[k] += any(labels[g] == labels[q] for g in reranked[:k])
    return {f"reranked_recall@{k}": hits[k] / n for k in ks}


_W = np.random.default_rng(0).normal(size=6).astype("float32")


def _weighted_product(a, b):
    """A scorer unlike cosine: sum_d w_d a_d b_d."""
    return tf.reduce_sum(tf.constant(_W) * a * b, axis=-1)


def test_matches_brute_force_and_batching_does_not_matter():
    rng = np.random.default_rng(1)
    emb = rng.normal(size=(40, 6)).astype("float32")
    labels = rng.integers(0, 8, size=40)
    expected = brute_force_reranked_recall(
        emb, labels, lambda a, b: float(np.sum(_W * a * b)), top_k=8, ks=(1, 2, 4, 8))
    for batch in (7, 8192):  # 7 does not divide 40 x 8: a padded last batch
        got = rerank_metrics(emb, labels, _weighted_product, top_k=8, pair_batch_size=batch)
        assert set(got) == set(expected) and all(isinstance(v, float) for v in got.values())
        for key in expected:
            assert got[key] == pytest.approx(expected[key], abs=1e-12), key
    plain = retrieval_metrics(emb, labels, ks=(1,), nmi=False)["recall@1"]
    assert abs(expected["reranked_recall@1"] - plain) > 0.02  # re-ranking did something


def test_cosine_scorer_reproduces_plain_recall_and_k_equal_top_k_is_unchanged():
    rng = np.random.default_rng(2)
    emb = rng.normal(size=(50, 5)).astype("float32")
    labels = rng.integers(0, 10, size=50)
    plain = retrieval_metrics(emb, labels, ks=(1, 2, 4, 8), nmi=False)
    cosine = rerank_metrics(emb, labels, lambda a, b: tf.reduce_sum(a * b, -1), top_k=8)
    for k in (1, 2, 4, 8):
        assert cosine[f"reranked_recall@{k}"] == pytest.approx(plain[f"recall@{k}"], abs=1e-6)
    # Any scorer only permutes the top_k: Recall@top_k cannot change.
    other = rerank_metrics(emb, labels, _weighted_product_5, top_k=4, ks=(1, 4, 8))
    assert set(other) == {"reranked_recall@1", "reranked_recall@4"}
    assert other["reranked_recall@4"] == pytest.approx(plain["recall@4"], abs=1e-6)


def _weighted_product_5(a, b):
    return tf.reduce_sum(tf.constant(_W[:5]) * a * b, axis=-1)


def test_saved_pddm_reranker_matches_the_unit(tmp_path):
    unit = _randomised_unit(hidden_dim=6, dim=5)
    path = os.path.join(tmp_path, "pddm.keras")
    pddm_pair_model(unit, 5).save(path)
    loaded = keras.saving.load_model(path)
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(30, 5)).astype("float32")
    expected = reranked_neighbours(emb, lambda a, b: unit(a, b, training=False), top_k=5)
    np.testing.assert_array_equal(reranked_neighbours(emb, pair_scorer(loaded), top_k=5), expected)


def test_rejects_bad_input():
    emb = np.eye(4, dtype="float32")
    with pytest.raises(ValueError, match="one label per embedding"):
        rerank_metrics(emb, [0, 1], _weighted_product, top_k=2)
    with pytest.raises(ValueError, match="Raise top_k"):
        rerank_metrics(emb, [0, 0, 1, 1], _weighted_product, top_k=1, ks=(2, 4))
    with pytest.raises(ValueError, match="k <= 3"):
        rerank_metrics(emb, [0, 0, 1, 1], _weighted_product, top_k=4, ks=(1,))


# --- end to end: kdml.train --method=pddm --rerank_top_k ----------------------------


def _run_train(argv):
    """`python -m kdml.train argv` in-process (absl flags parsed, then reset)."""
    from absl import flags

    from kdml import train as train_cli

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *argv])
    try:
        train_cli.main(["prog"])
    finally:
        flags.FLAGS.unparse_flags()


def test_train_pddm_reports_reranked_recall_and_writes_a_consistent_pddm_keras(tmp_path):
    import json

    from kdml.data import eval_dataset, load_dataset
    from kdml.training import embed
    from tests.helpers import write_glyph_folder

    root = write_glyph_folder(tmp_path / "glyphs",
                              class_dir=lambda label: f"alphabet{label // 6}/char{label:02d}")
    out = tmp_path / "run"
    argv = [f"--dataset=folder:{root}", f"--output_dir={out}", "--method=pddm", "--rerank_top_k=4",
            "--pddm_hidden_dim=8", "--pddm_mining=single", "--backbone=conv4", "--weights=none",
            "--image_size=16", "--embedding_dim=16", "--classes_per_batch=3",
            "--images_per_class=2", "--jit_compile=false", "--verbose=0", "--recall_ks=1,2,8"]

    def check():
        metrics = json.load(open(out / "metrics.json"))
        for result in (metrics["initial"], metrics["final"], *metrics["epochs"].values()):
            assert {"recall@1", "reranked_recall@1", "reranked_recall@2"} <= set(result)
            assert "reranked_recall@8" not in result  # K > top_k
        # pddm.keras + embedder.keras reproduce the run's own final re-ranked recall.
        reranker = keras.saving.load_model(out / "pddm.keras")
        embedder = keras.saving.load_model(out / "embedder.keras")
        test = load_dataset(f"folder:{root}").test
        emb = embed(embedder, eval_dataset(test, image_size=16, batch_size=256,
                                           crop_fraction=metrics["config"]["eval_crop_fraction"]))
        again = rerank_metrics(emb, test.labels, pair_scorer(reranker), top_k=4, ks=(1, 2))
        for key, value in again.items():
            assert value == pytest.approx(metrics["final"][key], abs=1e-9), key
        return metrics

    _run_train(argv + ["--epochs=1"])
    first = check()
    assert first["config"]["pddm_mining"] == "single" and first["config"]["pddm_hidden_dim"] == 8
    before = keras.saving.load_model(out / "pddm.keras").get_weights()
    _run_train(argv + ["--epochs=2", "--resume"])  # the unit is restored and trained on
    check()
    after = keras.saving.load_model(out / "pddm.keras").get_weights()
    assert max(np.abs(a - b).max() for a, b in zip(after, before)) > 1e-4
