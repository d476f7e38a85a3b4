"""The evaluation protocols of `python -m kdml.evaluate`, as functions of embeddings.

- `"retrieval"`: one set, leave-one-out (CUB-200, Cars196, SOP test classes).
- `"query_gallery"`: queries against a separate gallery (In-Shop), labels matched by
  class name.
- `"episodes"`: N-way K-shot episodes with a 95% interval (`few_shot_accuracy`).
- `"omniglot"`: Lake et al.'s 20-way within-alphabet one-shot protocol: episodes whose
  20 classes come from one alphabet, the alphabet of a class being the top-level folder
  of its path (`<alphabet>/<character>`).
"""

from __future__ import annotations

import os
import re
from typing import Optional

import numpy as np
from absl import logging

from kdml import layers  # noqa: F401  registers the PDDM layers of a re-ranker
from kdml.data.labels import warn_unknown_query_labels
from kdml.data.sources import load_dataset
from kdml.embedding import (embed_image_set, image_subset, load_image_embedder, load_uint8,
                            read_image_set)
from kdml.evaluation.clustering import DEFAULT_MAX_ITER
from kdml.evaluation.episodes import few_shot_accuracy
from kdml.evaluation.knn import _knn, exact_knn
from kdml.evaluation.metrics import retrieval_metrics
from kdml.evaluation.plots import (best_same_class_similarity, plot_tar_far_curve, retrieval_grid,
                                   write_plots)
from kdml.evaluation.projector import write_image_set_projector
from kdml.evaluation.rerank import rerank_metrics
from kdml.evaluation.verification import verification_metrics

PROTOCOLS = ("retrieval", "query_gallery", "episodes", "omniglot")
# `evaluate_model` is what `python -m kdml.evaluate` runs; it lives here, free of absl
# flags, so that it can be imported next to `kdml.train` (whose flags share names).


def top_level_groups(class_names, labels, as_names: bool = False) -> np.ndarray:
    """Group id per image: the first path component of its class name (`as_names`: that
    component itself, e.g. "Tagalog", so that errors name the alphabet; ids and names
    sort alike).

    `class_names` like `"Alphabet_of_the_Magi/character01"` (what `folder:` sources
    produce for `<root>/<alphabet>/<character>/<image>`). Raises ValueError when the
    names have no "/" (a flat folder of classes has no alphabets).
    """
    names = list(class_names)
    if not all("/" in name for name in names):
        flat = next(name for name in names if "/" not in name)
        raise ValueError(
            "The omniglot protocol groups classes by their top-level folder "
            "(<root>/<alphabet>/<character>/<image>). Received a class without one: "
            f"{flat!r}. Point --dataset at a folder of alphabets, or use "
            "--protocol=episodes.")
    alphabets = sorted({name.split("/", 1)[0] for name in names})
    group_of_class = np.array([alphabets.index(name.split("/", 1)[0]) for name in names])
    if as_names:
        return np.asarray(alphabets)[group_of_class][np.asarray(labels)]
    return group_of_class[np.asarray(labels)]


def align_labels(query_names, query_labels, gallery_names, gallery_labels):
    """Query and gallery labels in one label space, matched by class name.

    Returns `(query_labels, gallery_labels, class_names)`: int64 arrays indexing the
    sorted union of both sets' class names.
    """
    names = sorted(set(query_names) | set(gallery_names))
    index = {name: i for i, name in enumerate(names)}
    query_map = np.array([index[n] for n in query_names], np.int64)
    gallery_map = np.array([index[n] for n in gallery_names], np.int64)
    return (query_map[np.asarray(query_labels)], gallery_map[np.asarray(gallery_labels)],
            tuple(names))


_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6,
          "mib": 2**20, "g": 10**9, "gb": 10**9, "gib": 2**30}


def parse_bytes(text: str) -> int:
    """'256MiB' -> 268435456; '2GB' -> 2e9; '1000' -> 1000."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS or float(match.group(1)) <= 0:
        raise ValueError(f"--max_memory must be a positive size like 256MiB, 2GB or 1000000. "
                         f"Received: {text!r}")
    return int(float(match.group(1)) * _UNITS[unit])


def _knn_strategy():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return tf.distribute.MirroredStrategy() if len(gpus) > 1 else None


def evaluate_model(model_path: str, dataset: str = "synthetic", split=None, eval_dataset=None,
                   data_dir=None, ks=(1, 2, 4, 8), crop_fraction=0.875, batch_size=256,
                   seed=0, *, protocol="auto", query=None, gallery=None, precision_ks=None,
                   nmi="auto", kmeans_n_init=1, kmeans_max_iter=DEFAULT_MAX_ITER,
                   max_memory_bytes=256 * 2**20, knn_precision="float32", n_way=20, k_shot=1,
                   queries_per_class=1, episodes=1000, rerank_top_k=0, reranker=None,
                   plots_dir=None, plot_map="auto", plot_points=2000, grid_k=8,
                   grid_sampled=6, grid_worst=6, verification="auto",
                   fars=(1e-2, 1e-3, 1e-4), ranking_metrics=True, ndcg_ks=(10,),
                   threshold=None,
                   projector_dir=None, projector_points=10_000) -> dict:
    """Loads an embedder, embeds the protocol's images and returns the report dict.

    With `plots_dir`, the figures of `kdml.evaluation.plots.write_plots` plus
    `retrieval_grid.png`: `grid_sampled` seeded queries and the `grid_worst` worst ones
    (latest first same-class result), each followed by its top `grid_k`. `threshold`: a
    match threshold (cosine): grid rows whose best similarity is below it are marked "no
    match", and the similarity histograms draw it.

    `verification` (retrieval protocol): TAR at each FAR of `fars`, ROC AUC and EER over
    all pairs (`kdml.evaluation.verification_metrics`); `"auto"`: when the set has at
    most `VERIFICATION_AUTO_MAX` items (a few seconds), else skipped with a note; with
    plots, `tar_far.png`. `ranking_metrics` (retrieval and query_gallery protocols, float32
    k-NN): also MRR, mAP over the whole ranking and NDCG@K for each K of `ndcg_ks`, from
    the same ranking pass. With `projector_dir`, the files of TensorBoard's embedding
    projector for the (query) images: at most `projector_points` embeddings, their classes
    and thumbnails (`kdml.evaluation.projector`).

    Returns:
        `{"protocol", "split", "format", "metrics": {name: float}, "plots": {...},
        "retrieval_grid": {"sampled", "worst", "worst_ranks"}}` (the last two with plots).
    """
    if protocol == "auto":
        protocol = "query_gallery" if query or gallery else "retrieval"
    if protocol == "query_gallery" and not (query and gallery):
        raise ValueError("--protocol=query_gallery needs both --query=<source> and "
                         "--gallery=<source>.")
    if protocol != "query_gallery" and (query or gallery):
        raise ValueError(f"--query/--gallery belong to --protocol=query_gallery. Received: "
                         f"--protocol={protocol}")
    if split is None:
        split = "all" if protocol in ("omniglot",) else "test"
    if rerank_top_k and protocol != "retrieval":
        raise ValueError("--rerank_top_k works with --protocol=retrieval (leave-one-out).")
    embedder = load_image_embedder(model_path)
    embed_options = dict(batch_size=batch_size, crop_fraction=crop_fraction)
    full_ranking = ({"full_ranking": True, "ndcg_ks": tuple(ndcg_ks)}
                    if ranking_metrics and knn_precision == "float32" else {})
    report = {"protocol": protocol, "split": split, "format": embedder.format}

    if protocol == "query_gallery":
        query_set = read_image_set(query, "all" if query.startswith("folder:") else split,
                                   data_dir, seed)
        same_source = query == gallery
        gallery_set = query_set if same_source else read_image_set(
            gallery, "all" if gallery.startswith("folder:") else split, data_dir, seed)
        warn_unknown_query_labels(np.asarray(query_set.class_names)[query_set.labels],
                                  gallery_set.class_names, fix="point --query and --gallery "
                                  "at folders whose class sub-folders are named alike")
        query_embeddings = embed_image_set(embedder, query_set, **embed_options)
        gallery_embeddings = (query_embeddings if same_source
                              else embed_image_set(embedder, gallery_set, **embed_options))
        query_labels, gallery_labels, aligned_names = align_labels(
            query_set.class_names, query_set.labels, gallery_set.class_names, gallery_set.labels)
        metrics = retrieval_metrics(
            query_embeddings, query_labels, ks=ks, nmi=nmi, seed=seed,
            max_memory_bytes=max_memory_bytes, gallery=gallery_embeddings,
            gallery_labels=gallery_labels, exclude_self=same_source,
            precision_ks=ks if precision_ks is None else precision_ks, ami=nmi,
            n_init=kmeans_n_init, kmeans_max_iter=kmeans_max_iter,
            knn_precision=knn_precision, strategy=_knn_strategy(), **full_ranking)
        report.update(queries=int(len(query_labels)), gallery=int(len(gallery_labels)),
                      metrics=metrics)
        plot_embeddings, plot_labels = query_embeddings, query_labels
        curve_source = None
        verification_curve = None
        grid_sets = (query_set, query_embeddings, query_labels, gallery_set, gallery_embeddings,
                     gallery_labels, same_source)
        class_names = list(aligned_names)
    else:
        images = (read_image_set(dataset, split, data_dir, seed) if eval_dataset is None
                  else _load_eval_dataset(dataset, eval_dataset, split, data_dir, seed))
        embeddings = embed_image_set(embedder, images, **embed_options)
        labels = images.labels
        report["images"] = int(len(labels))
        plot_embeddings, plot_labels = embeddings, labels
        curve_source = (embeddings, labels)
        grid_sets = (images, embeddings, labels, images, embeddings, labels, True)
        class_names = list(images.class_names)
        verification_curve = None
        if protocol in ("episodes", "omniglot"):
            groups = (top_level_groups(images.class_names, labels, as_names=True)
                      if protocol == "omniglot" else None)
            report["metrics"] = few_shot_accuracy(
                embeddings, labels, n_way=n_way, k_shot=k_shot,
                queries_per_class=queries_per_class, num_episodes=episodes, groups=groups,
                seed=seed)
            report.update(n_way=n_way, k_shot=k_shot, queries_per_class=queries_per_class)
        else:
            metrics = retrieval_metrics(
                embeddings, labels, ks=ks, nmi=nmi, seed=seed, max_memory_bytes=max_memory_bytes,
                precision_ks=ks if precision_ks is None else precision_ks, ami=nmi,
                n_init=kmeans_n_init, kmeans_max_iter=kmeans_max_iter,
                knn_precision=knn_precision, strategy=_knn_strategy(), **full_ranking)
            if rerank_top_k:
                metrics.update(_rerank(model_path, reranker, embeddings, labels, rerank_top_k,
                                       ks, max_memory_bytes))
            verification_curve = _verification(metrics, report, embeddings, labels,
                                               verification, fars, max_memory_bytes)
            report["metrics"] = metrics

    if projector_dir:
        written = write_image_set_projector(projector_dir, grid_sets[1], grid_sets[0],
                                            max_points=projector_points, seed=seed)
        report["projector"] = {k: written[k] for k in ("directory", "points", "thumbnail")}

    if plots_dir:
        curve = _recall_curve(*(curve_source or (plot_embeddings, plot_labels)),
                              gallery=None if curve_source else (gallery_embeddings,
                                                                 gallery_labels),
                              exclude_self=protocol != "query_gallery" or same_source,
                              max_memory_bytes=max_memory_bytes)
        title = os.path.basename(os.path.normpath(model_path))
        os.makedirs(plots_dir, exist_ok=True)
        grid = _retrieval_grid(*grid_sets, os.path.join(plots_dir, "retrieval_grid.png"),
                               k=grid_k, num_sampled=grid_sampled, num_worst=grid_worst,
                               seed=seed, title=title, max_memory_bytes=max_memory_bytes,
                               threshold=threshold, class_names=class_names)
        report["plots"] = {"retrieval_grid": grid.pop("path"),
                           **write_plots(plot_embeddings, np.asarray(plot_labels), curve,
                                         plots_dir, map_method=plot_map, map_points=plot_points,
                                         seed=seed, title=title, threshold=threshold,
                                         class_names=class_names)}
        report["retrieval_grid"] = grid
        if verification_curve is not None:
            report["plots"]["tar_far"] = plot_tar_far_curve(
                verification_curve["far"], verification_curve["tar"],
                os.path.join(plots_dir, "tar_far.png"), title=title,
                negative_pairs=report["verification_pairs"]["negative"])
    return report


VERIFICATION_AUTO_MAX = 20_000


def _verification(metrics, report, embeddings, labels, verification, fars, max_memory_bytes):
    """Adds the all-pairs verification metrics to `metrics` (see `evaluate_model`);
    returns the ROC vertices, or None when skipped."""
    if verification not in ("auto", True, False):
        raise ValueError(f"Expected verification 'auto', True or False. Received: {verification!r}")
    if verification is False:
        return None
    if verification == "auto" and len(labels) > VERIFICATION_AUTO_MAX:
        report["verification_skipped"] = (
            f"{len(labels):,} images: --verification=auto runs up to "
            f"{VERIFICATION_AUTO_MAX:,} (about 10 s on 2 cores); pass --verification=true")
        logging.warning("TAR@FAR, ROC AUC and EER skipped: %s", report["verification_skipped"])
        return None
    result = verification_metrics(embeddings, labels, fars=fars,
                                  max_memory_bytes=max_memory_bytes, return_curve=True)
    curve = result.pop("curve", None)
    report["verification_pairs"] = {"positive": result.pop("positive_pairs"),
                                    "negative": result.pop("negative_pairs")}
    metrics.update(result)
    return curve


def _retrieval_grid(query_set, query_embeddings, query_labels, gallery_set, gallery_embeddings,
                    gallery_labels, leave_one_out, path, *, k, num_sampled, num_worst, seed,
                    title, max_memory_bytes, thumb=64, threshold=None, class_names=None):
    """`kdml.evaluation.plots.retrieval_grid` of a protocol's queries and gallery: worst
    rows ranked by their margins, rows named by `class_names`, "no match" below
    `threshold`."""
    k = max(1, min(int(k), len(gallery_labels) - int(leave_one_out)))
    neighbours, similarities = exact_knn(
        query_embeddings, None if leave_one_out else gallery_embeddings, k=k,
        max_memory_bytes=max_memory_bytes)
    best_same = best_same_class_similarity(
        query_embeddings, query_labels, gallery_embeddings, gallery_labels,
        own_rows=np.arange(len(query_labels)) if leave_one_out else None)

    def loader(image_set):
        return lambda rows: list(load_uint8(image_subset(image_set, np.asarray(rows)), thumb))

    return retrieval_grid(query_labels, neighbours, gallery_labels, loader(query_set),
                          loader(gallery_set), path, num_sampled=num_sampled,
                          num_worst=num_worst, seed=seed, thumb=thumb, title=title,
                          similarities=similarities, best_same=best_same,
                          threshold=threshold, class_names=class_names)


def _load_eval_dataset(dataset, eval_dataset, split, data_dir, seed):
    splits = load_dataset(dataset, eval_spec=eval_dataset, data_dir=data_dir, seed=seed)
    return getattr(splits, "test" if split == "all" else split)


def _recall_curve(embeddings, labels, *, gallery, exclude_self, max_memory_bytes):
    """Recall@K for K = 1, 2, 4, ... up to 1024 (capped by the gallery) from one k-NN pass."""
    labels = np.asarray(labels)
    gallery_embeddings, gallery_labels = (embeddings, labels) if gallery is None else gallery
    limit = len(gallery_labels) - int(exclude_self)
    ks = [k for k in (2**i for i in range(11)) if k <= limit]
    neighbours, _ = _knn(embeddings, None if gallery is None else gallery_embeddings,
                         k=max(ks), max_memory_bytes=max_memory_bytes,
                         exclude_self=exclude_self, return_similarities=False)
    hits = np.cumsum(gallery_labels[neighbours] == labels[:, None], axis=1) > 0
    return {k: float(hits[:, k - 1].mean()) for k in ks}


def _rerank(model_path, reranker, embeddings, labels, top_k, ks, max_memory_bytes):
    import keras

    if reranker is None:
        reranker = os.path.join(os.path.dirname(os.path.abspath(model_path)), "pddm.keras")
    if not os.path.isfile(reranker):
        raise FileNotFoundError(
            f"No re-ranker at {reranker}. Train with --method=pddm (it writes pddm.keras "
            "beside embedder.keras) or pass --reranker=<path>.keras.")
    scorer_model = keras.saving.load_model(reranker, compile=False)

    def scorer(a, b):
        return keras.ops.reshape(scorer_model([a, b], training=False), (-1,))

    return rerank_metrics(embeddings, labels, scorer, top_k=top_k, ks=ks,
                          max_memory_bytes=max_memory_bytes)


def default_output(model_path: str, protocol: str, split: str,
                   output_dir: Optional[str] = None) -> str:
    """`eval_<split>.json` (retrieval) or `eval_<protocol>_<split>.json` in `output_dir`
    (default: beside the model)."""
    directory = output_dir or os.path.dirname(os.path.abspath(os.path.normpath(model_path)))
    name = f"eval_{split}.json" if protocol == "retrieval" else f"eval_{protocol}_{split}.json"
    return os.path.join(directory, name)
