"""`python -m kdml.evaluate`: evaluate a saved embedder (.keras, SavedModel or .tflite).

Every format goes through one code path, `kdml.export.load_embedder(path).embed(images)`,
so the file a user ships is the file that is measured. Protocols (`--protocol`):

    retrieval      leave-one-out on one set (CUB, Cars, SOP): Recall@K, Precision@K,
                   MAP@R, R-Precision, NMI, AMI from one exact k-NN pass
    query_gallery  --query=<source> against --gallery=<source> (In-Shop); classes are
                   matched by name, a query is never matched to itself when the two
                   sources are the same
    episodes       N-way K-shot accuracy with a 95% interval (--n_way, --k_shot, ...)
    omniglot       20-way within-alphabet one-shot episodes over a folder of alphabets

Examples:
    python -m kdml.evaluate --model=runs/default/embedder.keras --dataset=synthetic
    python -m kdml.evaluate --model=export/embedder_int8.tflite --dataset=tfds:sop \\
        --recall_ks=1,10,100,1000 --plots
    python -m kdml.evaluate --model=embedder.keras --protocol=query_gallery \\
        --query=folder:/data/inshop/query --gallery=folder:/data/inshop/gallery
    python -m kdml.evaluate --model=embedder.keras --protocol=omniglot \\
        --dataset=folder:/data/omniglot/images_evaluation
    python -m kdml.evaluate --model=embedder.keras --dataset=folder:/data/queries --plots \\
        --index=gallery.index        # or --threshold=0.52: grid rows marked "no match"
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from kdml import command_line  # noqa: E402
from kdml.data.model_files import check_model_file  # noqa: E402
from kdml.evaluation import format_metrics_table  # noqa: E402
from kdml.evaluation.clustering import DEFAULT_MAX_ITER  # noqa: E402
from kdml.evaluation.protocols import default_output, evaluate_model, parse_bytes  # noqa: E402
from kdml.index import GalleryIndex  # noqa: E402
from kdml.quiet_startup import quiet_logs  # noqa: E402

FLAGS = flags.FLAGS
PROG = "python -m kdml.evaluate"
# Shared with the other commands (kdml.command_line): --model, --dataset, --seed, --output_dir.
command_line.define_flag("model", note="A .keras file, a SavedModel directory or a .tflite file.",
                         required=True)
flags.DEFINE_enum("protocol", "auto", ["auto", "retrieval", "query_gallery", "episodes",
                                       "omniglot"],
                  "auto: query_gallery when --query is given, else retrieval.")
command_line.define_flag("dataset", "synthetic")
flags.DEFINE_string("eval_dataset", None, "folder:<dir>: evaluate on this folder's classes.")
flags.DEFINE_enum("split", None, ["test", "train", "all"],
                  "Which classes of --dataset: test (default; the unseen half), train, or "
                  "all (every class; the default of --protocol=omniglot).")
flags.DEFINE_string("query", None, "Query source of --protocol=query_gallery: folder:<dir> "
                    "(every class of the folder) or a --dataset spec (its --split).")
flags.DEFINE_string("gallery", None, "Gallery source of --protocol=query_gallery.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_list("recall_ks", ["1", "2", "4", "8"], "K values of Recall@K.")
flags.DEFINE_list("precision_ks", None, "K values of Precision@K (default: --recall_ks).")
flags.DEFINE_enum("nmi", "auto", ["auto", "true", "false"],
                  "Report NMI and AMI (k-means with k = number of classes). auto: only where "
                  "k-means costs about as much as the ranking metrics; the result says when "
                  "it was skipped and why (docs/evaluation.md).")
flags.DEFINE_enum("verification", "auto", ["auto", "true", "false"],
                  "Retrieval protocol: TAR at --fars, ROC AUC and EER over all positive and "
                  "negative pairs (exact, blocked). auto: up to 20,000 images.")
flags.DEFINE_list("fars", ["1e-2", "1e-3", "1e-4"], "FAR levels of the TAR@FAR metrics.")
flags.DEFINE_boolean("ranking_metrics", True, "Also MRR, mAP over the whole ranking and "
                     "NDCG@K (--ndcg_ks), from the same ranking pass (float32 k-NN).")
flags.DEFINE_list("ndcg_ks", ["10"], "K values of NDCG@K.")
flags.DEFINE_integer("kmeans_n_init", 1, "k-means restarts for NMI / AMI.")
flags.DEFINE_integer("kmeans_max_iter", DEFAULT_MAX_ITER, "k-means Lloyd iterations at most.")
flags.DEFINE_string("max_memory", "256MiB", "Memory budget of the k-NN tiles, e.g. 512MiB, 2GB, "
                    "or a number of bytes.")
flags.DEFINE_enum("knn_precision", "float32", ["float32", "bfloat16"],
                  "k-NN scoring: float32 (exact) or a bfloat16 pass re-scored in float32.")
flags.DEFINE_integer("n_way", 20, "Classes per episode (episodes / omniglot).")
flags.DEFINE_integer("k_shot", 1, "Exemplars per class (episodes / omniglot).")
flags.DEFINE_integer("queries_per_class", 1, "Queries per class per episode.")
flags.DEFINE_integer("episodes", 1000, "Number of episodes.")
flags.DEFINE_integer("rerank_top_k", 0, "Re-rank each query's top-k cosine neighbours with "
                     "--reranker (0 = off; retrieval protocol).")
flags.DEFINE_string("reranker", None, "Pair scorer (a .keras model (n, d), (n, d) -> (n,)); "
                    "default: pddm.keras beside --model.")
flags.DEFINE_boolean("plots", False, "Write PNG figures: the retrieval grid (queries and "
                     "their top-k, same class or not), Recall@K curve, similarity histograms, "
                     "2-D map of the embeddings, and the TAR-FAR curve (retrieval protocol).")
flags.DEFINE_boolean("projector", False, "Write TensorBoard's embedding projector files (embeddings, "
                     "classes, thumbnail sprite) to eval_<split>_projector/: tensorboard --logdir "
                     "there, Projector tab.")
flags.DEFINE_integer("projector_points", 10000, "Images in the projector at most (a seeded sample).")
flags.DEFINE_integer("grid_k", 8, "Results per query in the retrieval grid.")
flags.DEFINE_integer("grid_sampled", 6, "Queries drawn at random (--seed) for the grid.")
flags.DEFINE_integer("grid_worst", 6, "Worst queries in the grid (their first same-class "
                     "result comes last).")
flags.DEFINE_float("threshold", None, "Match threshold (cosine) for --plots: grid rows whose "
                   "best similarity is below it are marked 'no match' (as python -m kdml.index "
                   "query --plot marks them); the similarity histograms draw it.")
flags.DEFINE_string("index", None, "A kdml.index directory built with --calibrate: its "
                    "calibrated threshold, as --threshold.")
flags.DEFINE_enum("plot_map", "auto", ["auto", "umap", "tsne"],
                  "2-D map: UMAP when installed (auto), or t-SNE.")
flags.DEFINE_integer("plot_points", 2000, "Images in the 2-D map at most.")
flags.DEFINE_float("crop_fraction", 0.875, "Centre-crop fraction of the shorter side.")
flags.DEFINE_integer("batch_size", 256, "Images per inference batch.")
command_line.define_flag("seed", 0, "It seeds k-means, episodes, plots and the synthetic dataset.")
command_line.define_flag("output_dir", None, "It gets the results, eval_<split>.json (or "
                         "eval_<protocol>_<split>.json for other protocols), and the figures of "
                         "--plots in eval_<split>_plots/. Default: the model's directory.")
flags.DEFINE_boolean("overwrite", False, "Replace a report of another dataset (--dataset, "
                     "--eval_dataset, --query, --gallery) at the same path; without it that is "
                     "an error (a report of the same data is always replaced).")


def _data_identity() -> dict:
    """What a report was computed on, beside the model (stored in it, compared on rewrite)."""
    return {"dataset": FLAGS.dataset, "eval_dataset": FLAGS.eval_dataset, "query": FLAGS.query,
            "gallery": FLAGS.gallery}


def _check_overwrite(output: str) -> None:
    """ValueError when `output` holds the report of other data and --overwrite is off."""
    import json

    if FLAGS.overwrite or not os.path.isfile(output):
        return
    try:
        with open(output) as f:
            old = json.load(f)
    except (OSError, ValueError):
        return  # not a report of ours: replaced
    ours = _data_identity()
    theirs = {name: old.get(name) for name in ours}
    if theirs != ours:
        what = ", ".join(f"--{k}={v}" for k, v in theirs.items() if v is not None)
        raise ValueError(f"{output}: holds the report of {what or 'other data'}; pass "
                         "--output_dir=<another folder> to keep it, or --overwrite to replace it")


def main(argv):
    import json

    del argv
    quiet_logs()
    protocol = FLAGS.protocol if FLAGS.protocol != "auto" else (
        "query_gallery" if FLAGS.query else "retrieval")
    data = (f"{FLAGS.query} against {FLAGS.gallery}" if protocol == "query_gallery"
            else FLAGS.eval_dataset or FLAGS.dataset)
    print(f"Evaluating {FLAGS.model} on {data} ({protocol})")
    try:
        threshold = _plot_threshold()
        check_model_file(FLAGS.model)
        _check_overwrite(default_output(FLAGS.model, protocol, FLAGS.split or (
            "all" if protocol == "omniglot" else "test"), FLAGS.output_dir))
        ks = tuple(int(k) for k in FLAGS.recall_ks)
        precision_ks = (None if FLAGS.precision_ks is None
                        else tuple(int(k) for k in FLAGS.precision_ks))
        plots_dir = None
        if FLAGS.plots:
            base = default_output(FLAGS.model, "retrieval", FLAGS.split or "test",
                                  FLAGS.output_dir)
            plots_dir = os.path.splitext(base)[0] + "_plots"
        report = evaluate_model(
            FLAGS.model, FLAGS.dataset, FLAGS.split, FLAGS.eval_dataset, FLAGS.data_dir, ks,
            FLAGS.crop_fraction, FLAGS.batch_size, FLAGS.seed, protocol=FLAGS.protocol,
            query=FLAGS.query, gallery=FLAGS.gallery, precision_ks=precision_ks,
            nmi={"auto": "auto", "true": True, "false": False}[FLAGS.nmi], kmeans_n_init=FLAGS.kmeans_n_init,
            kmeans_max_iter=FLAGS.kmeans_max_iter,
            max_memory_bytes=parse_bytes(FLAGS.max_memory), knn_precision=FLAGS.knn_precision,
            n_way=FLAGS.n_way, k_shot=FLAGS.k_shot, queries_per_class=FLAGS.queries_per_class,
            episodes=FLAGS.episodes, rerank_top_k=FLAGS.rerank_top_k, reranker=FLAGS.reranker,
            plots_dir=plots_dir, plot_map=FLAGS.plot_map, plot_points=FLAGS.plot_points,
            grid_k=FLAGS.grid_k, grid_sampled=FLAGS.grid_sampled, grid_worst=FLAGS.grid_worst,
            verification={"auto": "auto", "true": True, "false": False}[FLAGS.verification],
            fars=tuple(float(f) for f in FLAGS.fars), ranking_metrics=FLAGS.ranking_metrics,
            ndcg_ks=tuple(int(k) for k in FLAGS.ndcg_ks),
            threshold=None if threshold is None else threshold["value"],
            projector_dir=_projector_dir() if FLAGS.projector else None,
            projector_points=FLAGS.projector_points)
    except (ValueError, FileNotFoundError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    output = default_output(FLAGS.model, report["protocol"], report["split"], FLAGS.output_dir)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    with open(output, "w") as f:
        json.dump({"model": FLAGS.model, **_data_identity(), **report,
                   **({"threshold": threshold} if threshold else {})}, f, indent=2)
    print(format_metrics_table({os.path.basename(os.path.normpath(FLAGS.model)):
                                report["metrics"]}))
    for name, path in report.get("plots", {}).items():
        print(f"Wrote {name}: {path}")
    if "projector" in report:
        directory = report["projector"]["directory"]
        print(f"Wrote projector: {directory} ({report['projector']['points']} points; "
              f"tensorboard --logdir {directory})")
    print(f"Wrote {output}")


def _plot_threshold():
    """`{"value", "source"}` of --threshold or --index's calibrated threshold, or None;
    ValueError (one line) for a bad combination or an index without a threshold."""
    if FLAGS.threshold is None and FLAGS.index is None:
        return None
    if FLAGS.threshold is not None and FLAGS.index is not None:
        raise ValueError("Give --threshold=<cosine> or --index=<calibrated index>, not both.")
    if not FLAGS.plots:
        raise ValueError("--threshold and --index mark the retrieval grid of --plots: add "
                         "--plots.")
    if FLAGS.threshold is not None:
        if not -1.0 <= FLAGS.threshold <= 1.0:
            raise ValueError(f"--threshold is a cosine in [-1, 1]. Received: {FLAGS.threshold}")
        return {"value": float(FLAGS.threshold), "source": "--threshold"}
    index = GalleryIndex.load(FLAGS.index, verify=False)
    if not index.threshold:
        raise ValueError(f"{FLAGS.index}: this index holds no calibrated threshold; rebuild it "
                         "with python -m kdml.index build ... --calibrate=<labelled source>, or "
                         "pass --threshold=<cosine>.")
    return {"value": float(index.threshold["value"]), "source": os.path.abspath(FLAGS.index)}


def _projector_dir():
    """eval_<split>_projector/ (or eval_<protocol>_<split>_projector/) beside the report."""
    protocol = FLAGS.protocol if FLAGS.protocol != "auto" else (
        "query_gallery" if FLAGS.query else "retrieval")
    split = FLAGS.split or ("all" if protocol == "omniglot" else "test")
    return os.path.splitext(default_output(FLAGS.model, protocol, split, FLAGS.output_dir))[0] + "_projector"


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.absl_flags_parser(PROG))
