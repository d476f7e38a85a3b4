"""`tools/probe_pddm_unit.py` on a tiny saved embedder + PDDM unit: its AUCs match a
brute-force count over all (positive, negative) pair couples, and re-ranking depth 1
is the leave-one-out 1-NN accuracy."""

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _load_tool():
    spec = importlib.util.spec_from_file_location(
        "probe_pddm_unit", os.path.join(ROOT, "tools", "probe_pddm_unit.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _auc(scores, same):
    """P(positive pair scores above a negative one), ties counting one half."""
    pos, neg = scores[same], scores[~same]
    return float(((pos[:, None] > neg[None]) + 0.5 * (pos[:, None] == neg[None])).mean())


def test_probe_matches_brute_force(tmp_path, capsys):
    import keras

    import kdml  # noqa: F401
    from kdml.data.pipeline import eval_dataset
    from kdml.data.sources.folder import load_folder
    from kdml.layers.pddm import pddm_pair_model
    from tests.helpers import write_glyph_folder
    from tests.layers.test_pddm import _randomised_unit

    data = write_glyph_folder(tmp_path / "eval", num_classes=5, images_per_class=4)
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    keras.utils.set_random_seed(0)
    embedder = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Rescaling(1 / 255),
                                 keras.layers.Flatten(), keras.layers.Dense(5)])
    embedder.save(os.path.join(run_dir, "embedder.keras"))
    unit = _randomised_unit(hidden_dim=6, dim=5)
    pddm_pair_model(unit, 5).save(os.path.join(run_dir, "pddm.keras"))

    tool = _load_tool()
    got = tool.probe(run_dir, data, image_size=16)

    images = load_folder(data, verify_images=False)
    emb = embedder.predict(eval_dataset(images, image_size=16).map(lambda x, y: x), verbose=0)
    labels = np.asarray(images.labels)
    n = len(labels)
    rows, cols = np.triu_indices(n, k=1)
    same = labels[rows] == labels[cols]
    normed = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    cosine = np.sum(normed[rows] * normed[cols], axis=1)
    scores = np.asarray(unit(emb[rows], emb[cols]))
    assert got["pairs"] == n * (n - 1) // 2 and got["positive_pairs"] == 5 * 6
    assert got["cosine_auc"] == pytest.approx(_auc(cosine, same), abs=1e-6)
    assert got["unit_auc"] == pytest.approx(_auc(scores, same), abs=1e-6)
    assert got["unit_score_std"] == pytest.approx(scores.std(), rel=1e-4)
    sims = normed @ normed.T
    np.fill_diagonal(sims, -np.inf)
    one_nn = float(np.mean(labels[np.argmax(sims, axis=1)] == labels))
    assert got["reranked_recall@1"]["1"] == pytest.approx(one_nn, abs=1e-9)

    tool.main([f"--run_dir={run_dir}", f"--data={data}", "--image_size=16"])
    assert "Probing the PDDM unit of" in capsys.readouterr().out
