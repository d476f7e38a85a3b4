"""`python -m kdml.evaluate` end to end on a tiny conv4 embedder, in every format.

The CLI's numbers are checked against the library called directly on the same
embeddings (retrieval, query/gallery, Omniglot episodes), the three formats against
each other, and bad input against its one-line error.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

import kdml
from kdml.embedding import embed_image_set, read_image_set
from kdml.evaluation import protocols as evaluate_cli
from kdml.evaluation import few_shot_accuracy, retrieval_metrics, verification_metrics
from kdml.evaluation.clustering import DEFAULT_MAX_ITER
from kdml.evaluation.protocols import top_level_groups
from kdml.export import load_embedder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 28


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """An untrained conv4 embedder (d = 16) as .keras, SavedModel and float32 .tflite."""
    from kdml.export.exporter import export_embedder

    root = tmp_path_factory.mktemp("evaluate")
    keras.utils.set_random_seed(0)
    embedder = kdml.models.build_embedder("conv4", embedding_dim=16, image_size=SIZE)
    keras_path = str(root / "embedder.keras")
    embedder.save(keras_path)
    paths = export_embedder(embedder, str(root / "export"), formats=("saved_model", "tflite"),
                            quantizations=("float32",))
    return {"keras": keras_path, "saved_model": paths["saved_model"],
            "tflite": paths["tflite_float32"], "root": str(root)}


@pytest.fixture(scope="module")
def alphabets(tmp_path_factory):
    """<root>/<alphabet>/<character>/<image>.png: 2 alphabets x 3 characters x 3 images,
    and a query/gallery pair of folders where gallery class 'c' has a single image."""
    root = tmp_path_factory.mktemp("folders")
    rng = np.random.default_rng(0)

    def write(folder, count, base):
        os.makedirs(folder, exist_ok=True)
        for i in range(count):
            noise = rng.integers(0, 60, size=(SIZE, SIZE, 3))
            pixels = np.clip(base + noise, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.png"))

    bases = {}
    for a in ("alpha", "beta"):
        for c in range(3):
            bases[(a, c)] = rng.integers(0, 190, size=(SIZE, SIZE, 3))
            write(root / "omniglot" / a / f"char{c}", 3, bases[(a, c)])
    for name, base in (("a", bases[("alpha", 0)]), ("b", bases[("alpha", 1)]),
                       ("c", bases[("beta", 0)])):
        write(root / "inshop" / "query" / name, 2, base)
        write(root / "inshop" / "gallery" / name, 1 if name == "c" else 3, base)
    return root


def _embed(path, image_set):
    return embed_image_set(load_embedder(path), image_set)


def test_retrieval_report_equals_the_library_on_the_same_embeddings(models):
    report = evaluate_cli.evaluate_model(models["keras"], "synthetic", ks=(1, 4), seed=0)
    assert report["protocol"] == "retrieval" and report["format"] == "keras"
    test = kdml.data.load_dataset("synthetic").test
    embedder = keras.saving.load_model(models["keras"])
    images = kdml.data.eval_dataset(test, image_size=SIZE)
    embeddings = embedder.predict(images.map(lambda x, y: x), verbose=0)
    # the CLI's defaults: --nmi=auto (runs at this size), --kmeans_max_iter=10, --kmeans_n_init=1
    want = retrieval_metrics(embeddings, test.labels, ks=(1, 4), precision_ks=(1, 4), ami=True,
                             nmi=True, kmeans_max_iter=DEFAULT_MAX_ITER, n_init=1,
                             full_ranking=True, ndcg_ks=(10,))  # the CLI's MRR, mAP, NDCG@10
    assert not math.isnan(want["nmi"])
    # --verification=auto runs at this size: TAR@FAR, ROC AUC and EER over all pairs
    verification = verification_metrics(embeddings, test.labels)
    assert report["verification_pairs"] == {"positive": verification.pop("positive_pairs"),
                                            "negative": verification.pop("negative_pairs")}
    want.update(verification)
    assert set(report["metrics"]) == set(want)
    for name, value in want.items():
        assert report["metrics"][name] == pytest.approx(value, abs=1e-6), name


def test_three_formats_give_the_same_embeddings_and_metrics(models, alphabets):
    folder = f"folder:{alphabets / 'omniglot'}"
    image_set = read_image_set(folder, "all", None, 0)
    pixels = np.concatenate([x.numpy() for x, _ in kdml.data.eval_dataset(image_set,
                                                                          image_size=SIZE)])
    keras_embedder = load_embedder(models["keras"])
    for fmt in ("saved_model", "tflite"):
        loaded = load_embedder(models[fmt])
        assert loaded.format == fmt and loaded.image_size == (SIZE, SIZE)
        # exported files may take uint8 pixels (MediaPipe): compare on what they receive
        fed = np.round(pixels) if loaded.input_dtype == np.uint8 else pixels
        reference = keras_embedder.embed(fed)
        embeddings = _embed(models[fmt], image_set)
        np.testing.assert_allclose(embeddings, reference, atol=2e-4)
        report = evaluate_cli.evaluate_model(models[fmt], folder, split="all", ks=(1, 2),
                                             nmi=False, verification=False,
                                             ranking_metrics=False)
        assert report["format"] == fmt
        want = retrieval_metrics(reference, image_set.labels, ks=(1, 2), precision_ks=(1, 2),
                                 nmi=False)
        assert report["metrics"] == pytest.approx(want, abs=1e-6)


def test_omniglot_protocol_over_a_folder_of_alphabets(models, alphabets):
    folder = f"folder:{alphabets / 'omniglot'}"
    report = evaluate_cli.evaluate_model(models["keras"], folder, protocol="omniglot",
                                         n_way=3, episodes=50, seed=2)
    assert report["split"] == "all" and report["images"] == 18
    image_set = read_image_set(folder, "all", None, 0)
    groups = top_level_groups(image_set.class_names, image_set.labels)
    assert groups.tolist() == [0] * 9 + [1] * 9
    want = few_shot_accuracy(_embed(models["keras"], image_set), image_set.labels, n_way=3,
                             num_episodes=50, groups=groups, seed=2)
    assert report["metrics"] == want
    with pytest.raises(ValueError, match="at least n_way = 4"):
        evaluate_cli.evaluate_model(models["keras"], folder, protocol="omniglot", n_way=4)


def test_query_gallery_protocol_with_a_single_image_gallery_class(models, alphabets):
    query = f"folder:{alphabets / 'inshop' / 'query'}"
    gallery = f"folder:{alphabets / 'inshop' / 'gallery'}"
    report = evaluate_cli.evaluate_model(models["keras"], query=query, gallery=gallery,
                                         ks=(1, 2), nmi=False)
    assert report["protocol"] == "query_gallery"
    assert report["queries"] == 6 and report["gallery"] == 7  # class c: one gallery image
    q_set = read_image_set(query, "all", None, 0)
    g_set = read_image_set(gallery, "all", None, 0)
    want = retrieval_metrics(_embed(models["keras"], q_set), q_set.labels, ks=(1, 2),
                             precision_ks=(1, 2), nmi=False, gallery=_embed(models["keras"], g_set),
                             gallery_labels=g_set.labels, exclude_self=False,
                             full_ranking=True, ndcg_ks=(10,))
    assert report["metrics"] == pytest.approx(want, abs=1e-6)
    # the same source twice is leave-one-out, not "every query finds itself"
    same = evaluate_cli.evaluate_model(models["keras"], query=gallery, gallery=gallery,
                                       ks=(1,), nmi=False)
    g_embeddings = _embed(models["keras"], g_set)
    with pytest.warns(UserWarning):  # class c has no other image
        loo = retrieval_metrics(g_embeddings, g_set.labels, ks=(1,), precision_ks=(1,), nmi=False,
                                full_ranking=True, ndcg_ks=(10,))
    assert same["metrics"] == pytest.approx(loo, abs=1e-6)


def test_rerank_with_a_cosine_scorer_changes_nothing(models, alphabets, tmp_path):
    # a "re-ranker" that scores by cosine re-orders the cosine top-k into itself
    import shutil

    folder = f"folder:{alphabets / 'omniglot'}"
    a, b = keras.Input((16,)), keras.Input((16,))
    scorer = keras.Model([a, b], keras.layers.Dot(axes=1, normalize=True)([a, b]))
    model_path = str(tmp_path / "embedder.keras")
    shutil.copy(models["keras"], model_path)
    scorer.save(str(tmp_path / "pddm.keras"))
    report = evaluate_cli.evaluate_model(model_path, folder, split="all", ks=(1, 4), nmi=False,
                                         rerank_top_k=8)
    metrics = report["metrics"]
    for k in (1, 4):
        assert metrics[f"reranked_recall@{k}"] == pytest.approx(metrics[f"recall@{k}"], abs=1e-3)
    with pytest.raises(FileNotFoundError, match="pddm.keras"):
        evaluate_cli.evaluate_model(models["saved_model"], folder, split="all", rerank_top_k=8)
    with pytest.raises(FileNotFoundError, match="No model"):
        evaluate_cli.evaluate_model(str(tmp_path / "missing.keras"), folder)


def test_wrong_input_shape_is_a_clear_error(tmp_path):
    images = keras.Input((SIZE, SIZE + 4, 3))
    model = keras.Model(images, keras.layers.Dense(4)(keras.layers.Flatten()(images)))
    path = str(tmp_path / "wide.keras")
    model.save(path)
    with pytest.raises(ValueError, match=r"28 x 32.*square"):
        evaluate_cli.evaluate_model(path, "synthetic", nmi=False)


def test_parse_bytes():
    assert evaluate_cli.parse_bytes("256MiB") == 256 * 2**20
    assert evaluate_cli.parse_bytes("2GB") == 2 * 10**9
    assert evaluate_cli.parse_bytes("1000") == 1000
    with pytest.raises(ValueError, match="--max_memory"):
        evaluate_cli.parse_bytes("lots")


def test_command_line_end_to_end_with_plots(models, alphabets, tmp_path):
    """--plots with --index=<an index holding a calibrated threshold>: the figures, the
    worst rows (rank, then margin) and the "no match" rows of the grid."""
    from kdml.evaluation.plots import grid_size, no_match_caption
    from kdml.index import GalleryIndex

    image_set = read_image_set(f"folder:{alphabets / 'omniglot'}", "all", None, 0)
    x = _embed(models["saved_model"], image_set)
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    scores = x @ x.T
    np.fill_diagonal(scores, -np.inf)
    # a threshold between the queries' best similarities: about half are "no match"
    threshold = float(np.median(scores.max(axis=1)))
    index = GalleryIndex(x, image_set.labels.astype(str))
    index.set_threshold({"threshold": threshold, "target": {"precision": 0.9}}, "by hand")
    index.save(str(tmp_path / "t.index"))
    output = tmp_path / "eval_all.json"  # eval_<split>.json in --output_dir
    result = subprocess.run(
        [sys.executable, "-m", "kdml.evaluate", f"--model={models['saved_model']}",
         f"--dataset=folder:{alphabets / 'omniglot'}", "--split=all", "--recall_ks=1,2",
         "--max_memory=1MiB", "--plots", "--plot_map=tsne", "--grid_k=3", "--grid_sampled=2",
         "--grid_worst=3", f"--output_dir={tmp_path}", f"--index={tmp_path / 't.index'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| saved_model | " in result.stdout
    report = json.load(open(output))
    assert report["format"] == "saved_model" and report["protocol"] == "retrieval"
    for key in ("recall@1", "recall@2", "precision@2", "map@r", "r_precision", "nmi", "ami"):
        assert 0.0 <= report["metrics"][key] <= 1.0 or key == "ami"
    for key in ("tar@far=0.01", "tar@far=0.001", "tar@far=0.0001", "roc_auc", "eer", "mrr",
                "map", "ndcg@10"):
        assert 0.0 <= report["metrics"][key] <= 1.0, key
    for name in ("retrieval_grid", "recall_curve", "similarity_histograms", "embedding_map",
                 "tar_far"):
        path = report["plots"][name]
        assert os.path.getsize(path) > 1000 and open(path, "rb").read(4) == b"\x89PNG"
    assert report["threshold"] == {"value": threshold,
                                   "source": os.path.abspath(tmp_path / "t.index")}

    # the grid's worst rows: the queries whose first same-class neighbour (leave-one-out,
    # NumPy cosine top-3, stable ties) comes last, none in the top 3 counting as rank 4;
    # ties: the highest margin (best other cosine - best same-class cosine) first
    top = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    labels = image_set.labels
    same = labels[top] == labels[:, None]
    ranks = np.where(same.any(axis=1), same.argmax(axis=1) + 1, 4)
    pairs = labels[:, None] == labels[None, :]
    margin = (np.where(~pairs, scores, -np.inf).max(1)
              - np.where(pairs, scores, -np.inf).max(1))
    worst = sorted(range(len(ranks)), key=lambda q: (-ranks[q], -margin[q], q))[:3]
    grid = report["retrieval_grid"]
    assert grid["worst"] == worst and grid["worst_ranks"] == [int(ranks[q]) for q in worst]
    assert len(grid["sampled"]) == 2 and not set(grid["sampled"]) & set(worst)
    shown = grid["sampled"] + grid["worst"]
    below = [q for q in shown if np.float32(scores[q].max()) < np.float32(threshold)]
    assert grid["no_match"] == below
    captions = [no_match_caption(float(np.float32(scores[q].max())), threshold) if q in below
                else None for q in shown]
    with Image.open(report["plots"]["retrieval_grid"]) as png:
        assert png.size == grid_size(5, 3, 64, captions)


@pytest.mark.slow  # about 20 s each: a TensorFlow start-up per run
@pytest.mark.parametrize("flags, message", [
    (["--plots", "--threshold=0.5", "--index=x.index"], "error: Give --threshold=<cosine> or "
     "--index=<calibrated index>, not both."),
    (["--threshold=0.5"], "error: --threshold and --index mark the retrieval grid of --plots"),
    (["--plots", "--threshold=1.5"], "error: --threshold is a cosine in [-1, 1]"),
])
def test_bad_threshold_flags_are_one_line_errors(models, tmp_path, flags, message):
    result = subprocess.run(
        [sys.executable, "-m", "kdml.evaluate", f"--model={models['keras']}",
         f"--output_dir={tmp_path}", *flags], cwd=ROOT, capture_output=True, text=True,
        timeout=300)
    assert result.returncode == 2 and result.stderr.strip().startswith(message), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and not os.listdir(tmp_path)
