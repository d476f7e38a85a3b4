"""`python -m kdml.index build|query|evaluate`: a gallery index of a saved embedder.

    python -m kdml.index build --model=runs/default/embedder.keras \\
        --source=folder:gallery/ --output_dir=gallery.index [--backend=faiss [--faiss_index=hnsw]]
    python -m kdml.index build ... --output_dir=gallery.index --add      # append new images
    python -m kdml.index query --index=gallery.index --model=runs/default/embedder.keras \\
        --k=5 q1.jpg q2.png      # or --query_source=folder:queries/ ; --plot=grid.png
    python -m kdml.index evaluate --index=gallery.index --k=10     # recall@10 vs exact, q/s

`--strategy=multi_worker` (with TF_CONFIG on every worker) splits the build over the
workers (see `kdml.index.build`). Bad input is a one-line `error:` (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from kdml.command_line import (add_argument, argparse_flag_names,  # noqa: E402
                               check_flag_spellings, set_verbosity)
from kdml.data.decoding import check_image_files  # noqa: E402
from kdml.data.labels import warn_unknown_query_labels  # noqa: E402
from kdml.data.model_files import check_model_file  # noqa: E402
from kdml.distribute import STRATEGIES  # noqa: E402
from kdml.embedding import (IndexFormatError, embed_image_set, load_embedder,  # noqa: E402
                            load_source, model_fingerprint, read_image_files)
from kdml.evaluation.plots import (best_same_class_similarity, load_image_files,  # noqa: E402
                                   retrieval_grid)
from kdml.index import GalleryIndex, QueryResult, build_index  # noqa: E402
from kdml.index.approximation import measure_approximation  # noqa: E402
from kdml.index.backends import BACKENDS, FAISS_INDEXES  # noqa: E402
from kdml.index.build import _item_paths  # noqa: E402
from kdml.index.records import file_key, query_record  # noqa: E402

PROG = "python -m kdml.index"
# The file each subcommand writes into its --output_dir (build: the index directory itself).
QUERY_FILE, EVALUATE_FILE = "query.json", "evaluate.json"


def _backend_options(args) -> dict:
    options = {}
    for name in ("faiss_index", "nlist", "nprobe", "hnsw_m", "ef_construction", "ef_search",
                 "target_recall"):
        value = getattr(args, name, None)
        if value is not None:
            options[name] = value
    return options


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def ann_flags(p):
        p.add_argument("--faiss_index", choices=FAISS_INDEXES, default=None,
                       help="faiss: ivf (IndexIVFFlat, default) or hnsw (IndexHNSWFlat)")
        p.add_argument("--nlist", type=int, help="faiss ivf: cells (default ~4 sqrt(N))")
        p.add_argument("--nprobe", type=int,
                       help="faiss ivf: cells per query (default: calibrated)")
        p.add_argument("--hnsw_m", type=int, help="faiss hnsw: links per node (32)")
        p.add_argument("--ef_construction", type=int,
                       help="faiss hnsw: candidates per insertion (40)")
        p.add_argument("--ef_search", type=int,
                       help="faiss hnsw: candidates per query (default: calibrated)")
        p.add_argument("--target_recall", type=float,
                       help="faiss: recall@10 vs exact the nprobe / ef_search calibration aims "
                            "for (0.97)")

    build = sub.add_parser("build", help="embed a labelled image source into an index directory")
    model_note = "A .keras file, a SavedModel directory or a .tflite file."
    add_argument(build, "model", note=model_note, required=True)
    build.add_argument("--source", required=True,
                       help="folder:<dir> (<class>/<image>), synthetic or tfds:<name>")
    add_argument(build, "output_dir", note="The index directory.", required=True)
    build.add_argument("--backend", choices=BACKENDS, default="exact")
    build.add_argument("--strategy", choices=STRATEGIES, default="auto")
    build.add_argument("--split", choices=("test", "train", "all"), default="all",
                       help="classes of a dataset source (folder: sources use every class)")
    build.add_argument("--data_dir", default=None)
    build.add_argument("--batch_size", type=int, default=256)
    build.add_argument("--crop_fraction", type=float, default=0.875)
    build.add_argument("--shard_size", type=int, default=10_000,
                       help="images per shard (the unit a re-run skips and workers split)")
    build.add_argument("--wait_timeout_s", type=float, default=3600.0,
                       help="how long the chief waits for the other workers' shards")
    build.add_argument("--add", action="store_true",
                       help="append the source to the existing index at --output_dir")
    build.add_argument("--allow_model_mismatch", action="store_true")
    add_argument(build, "seed", 0, "It draws the split of a dataset source.")
    build.add_argument("--calibrate", default=None,
                       help="labelled validation source (folder:<dir>, synthetic, tfds:<name>) "
                            "whose leave-one-out top-1 decisions set the 'no match' threshold")
    build.add_argument("--target_precision", type=float, default=None,
                       help="--calibrate: top-1 precision of accepted queries (default 0.95)")
    build.add_argument("--target_far", type=float, default=None,
                       help="--calibrate: false accept rate over impostor pairs instead")
    ann_flags(build)

    query = sub.add_parser("query", help="top-k gallery items of query images")
    query.add_argument("--index", required=True)
    add_argument(query, "model", note=model_note + " It embeds the queries.", required=True)
    query.add_argument("--query_source", "--source", dest="query_source", default=None,
                       help="labelled queries: folder:<dir>, labelled as --source labels a "
                            "gallery (leaf folder path relative to <dir>)")
    query.add_argument("images", nargs="*", help="query image files, labelled in the gallery's "
                       "terms (kdml.embedding.query_labels); a gallery file used as a query is not "
                       "returned for itself")
    query.add_argument("--k", type=int, default=5)
    query.add_argument("--backend", choices=BACKENDS, default=None,
                       help="search with another backend than the saved one")
    query.add_argument("--plot", default=None, help="PNG retrieval grid to write")
    query.add_argument("--plot_sampled", type=int, default=6, help="seeded sample rows")
    query.add_argument("--plot_worst", type=int, default=6, help="worst-query rows")
    add_argument(query, "output_dir", note=f"It gets the results, {QUERY_FILE} (default: the "
                 "JSON goes to stdout).")
    query.add_argument("--allow_model_mismatch", action="store_true")
    query.add_argument("--batch_size", type=int, default=256)
    query.add_argument("--crop_fraction", type=float, default=0.875)
    add_argument(query, "seed", 0, "It draws the sampled rows of --plot.")

    evaluate = sub.add_parser("evaluate", help="recall@k of the approximate search vs exact, "
                              "and queries/s of both")
    evaluate.add_argument("--index", required=True)
    evaluate.add_argument("--k", type=int, default=10)
    evaluate.add_argument("--backend", choices=BACKENDS[1:], default=None,
                          help="approximate backend (default: the index's, else faiss)")
    evaluate.add_argument("--num_queries", type=int, default=1000,
                          help="gallery rows used as queries (their own row excluded)")
    add_argument(evaluate, "seed", 0, "It draws the query rows.")
    add_argument(evaluate, "output_dir", note=f"It gets the report, {EVALUATE_FILE} (default: "
                 "printed only).")
    ann_flags(evaluate)
    for command in (build, query, evaluate):
        add_argument(command, "verbosity")
    return parser


def _build(args):
    check_model_file(args.model)

    add_to = GalleryIndex.load(args.output_dir) if args.add else None
    index = build_index(args.model, args.source, args.output_dir, backend=args.backend,
                        backend_options=_backend_options(args), strategy=args.strategy,
                        split=args.split, data_dir=args.data_dir, batch_size=args.batch_size,
                        crop_fraction=args.crop_fraction, shard_size=args.shard_size,
                        seed=args.seed, wait_timeout_s=args.wait_timeout_s, add_to=add_to,
                        allow_model_mismatch=args.allow_model_mismatch,
                        calibrate=args.calibrate, target_precision=args.target_precision,
                        target_far=args.target_far)
    if index is None:
        print(f"Wrote this worker's shards of {args.output_dir}; the chief merges them.")
        return
    config = index.backend.config()
    print(f"Indexed {len(index)} images of {len(set(index.labels.tolist()))} classes "
          f"(d = {index.dim}, backend {index.backend.name}"
          + (f" {json.dumps(config)}" if config else "") + f"): {args.output_dir}")
    if index.threshold:
        t = index.threshold
        target = ", ".join(f"{k} {v:g}" for k, v in t["target"].items())
        print(f"Threshold cosine >= {t['value']:.6f} (target {target}, on {t['source']}: "
              f"precision {t['precision']:.4f}, recall {t['recall']:.4f}, FAR {t['far']:.2e}; "
              f"accepts {t['accepted']:,} of {t['queries']:,} queries, "
              f"{100 * t['accepted'] / max(t['queries'], 1):.1f} %)")


def _query(args):
    if bool(args.query_source) == bool(args.images):
        raise ValueError("Give query images either as files (positional) or as --query_source="
                         "folder:<dir>, not both and not neither.")
    check_image_files(args.images)  # a bad query file is refused, not skipped
    check_model_file(args.model)
    index = GalleryIndex.load(args.index, backend=args.backend)
    embedder = load_embedder(args.model)
    index.check_model(model_fingerprint(embedder), args.allow_model_mismatch)
    if args.query_source:
        queries = load_source(args.query_source)
    else:
        queries = read_image_files(args.images, index.labels, index.paths)
    query_paths = _item_paths(queries)  # "<source>#<row>" for images without files
    query_names = [queries.class_names[label] for label in queries.labels]
    warn_unknown_query_labels(query_names, index.labels, fix=(
        "point --query_source at the folder whose sub-folders are named like --source's"
        if args.query_source else "query with files inside the gallery's folder tree"))
    embeddings = embed_image_set(embedder, queries, batch_size=args.batch_size,
                                 crop_fraction=args.crop_fraction)
    result = index.query(embeddings, k=args.k + 1)
    threshold = index.threshold["value"] if index.threshold else None
    records = [query_record(path, label, hits, args.k, threshold)
               for path, label, hits in zip(query_paths, query_names, result.as_records())]
    if args.plot:  # the grid's top-k, the query's own file left out as in the records
        result = _without_self(result, query_paths, args.k)
        class_names = sorted(set(index.labels.tolist()) | set(query_names))
        label_ids = {name: i for i, name in enumerate(class_names)}
        query_ids = np.array([label_ids[n] for n in query_names])
        gallery_ids = np.array([label_ids[n] for n in index.labels])
        row_of = {str(path): row for row, path in enumerate(index.paths.tolist())}
        grid = retrieval_grid(
            query_ids, result.indices, gallery_ids,
            lambda rows: load_image_files(queries.paths[rows]),
            lambda rows: load_image_files(index.paths[rows]), args.plot,
            num_sampled=args.plot_sampled, num_worst=args.plot_worst, seed=args.seed,
            title=os.path.basename(os.path.normpath(args.index)),
            similarities=result.similarities, class_names=class_names,
            best_same=best_same_class_similarity(  # a gallery file as query: not itself
                embeddings, query_ids, index.embeddings, gallery_ids,
                own_rows=[row_of.get(str(p), -1) for p in query_paths]),
            threshold=index.threshold["value"] if index.threshold else None)
        print(f"Wrote the retrieval grid: {grid['path']}", file=sys.stderr)
    text = json.dumps(records, indent=1)
    if args.output_dir:
        output = _output_file(args.output_dir, QUERY_FILE)
        with open(output, "w") as f:
            f.write(text)
        print(f"Wrote {output}")
    else:
        print(text)


def _output_file(output_dir: str, name: str) -> str:
    os.makedirs(output_dir, exist_ok=True)
    return os.path.join(output_dir, name)


def _without_self(result, query_paths, k):
    """The top-k without the gallery item that is the query's own file (a gallery image
    used as a query), from a top-(k + 1) result."""
    keep = np.asarray([[file_key(path) != file_key(query) for path in row]
                       for row, query in zip(result.paths, query_paths)])
    keep &= np.cumsum(keep, axis=1) <= k
    rows = [np.flatnonzero(row)[:k] for row in keep]
    k = min(len(r) for r in rows)
    take = np.stack([r[:k] for r in rows])
    return QueryResult(*(np.take_along_axis(a, take, axis=1) for a in (
        result.indices, result.similarities, result.labels, result.paths)))


def _evaluate(args):
    index = GalleryIndex.load(args.index)
    report = measure_approximation(index, k=args.k, approximate=args.backend,
                                   num_queries=args.num_queries, seed=args.seed,
                                   backend_options=_backend_options(args))
    print(f"| search | recall@{report['k']} vs exact | queries/s |")
    print("|---|---:|---:|")
    print(f"| exact | 1.0000 | {report['exact_qps']:,.0f} |")
    print(f"| {report['backend']} {json.dumps(report['config'])} | {report['recall_at_k']:.4f} | "
          f"{report['approximate_qps']:,.0f} |")
    print(f"{report['gallery']:,} gallery items, {report['queries']:,} queries (gallery rows, "
          f"own row excluded); approximate / exact: {report['speedup']:.1f}x")
    if args.output_dir:
        output = _output_file(args.output_dir, EVALUATE_FILE)
        with open(output, "w") as f:
            json.dump(report, f, indent=2)
        print(f"Wrote {output}")


def main(argv=None) -> int:
    parser = _parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    check_flag_spellings(argv, argparse_flag_names(parser, argv), PROG,
                         {"dataset": "source", "gallery": "source"})
    args = parser.parse_args(argv)
    set_verbosity(args.verbosity)
    try:
        {"build": _build, "query": _query, "evaluate": _evaluate}[args.command](args)
    except (ValueError, FileNotFoundError, IndexFormatError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
