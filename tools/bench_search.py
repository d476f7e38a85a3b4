"""Search model benchmark: size and latency per gallery size, agreement with exact search,
and a calibrated threshold on unseen classes.

    python tools/bench_search.py latency                 # 1k / 10k / 100k items, d = 128 / 512
    python tools/bench_search.py latency --sizes=1000 --dims=128 --runs=20   # a quick one
    python tools/bench_search.py agreement --model=run/embedder.keras \\
        --source=folder:omniglot/images_background_small2 --queries=1000
    python tools/bench_search.py open_set --model=run/embedder.keras \\
        --validation=folder:<val classes> --test=folder:<test classes> --target_precision=0.95

`latency`: for each embedding size d (`--dims`) a conv4 embedder (`--image_size`,
random weights: the cost does not depend on them) is exported as a float32 `.tflite`;
for each gallery size (`--sizes`) and storage (`float16`, `int8`) a random unit gallery
is appended (`kdml.export.search.append_search`) and the file's size and LiteRT
latency (`ai_edge_litert`, `--threads`, batch 1, the median of `--runs` invocations after
3 warm-ups) are printed beside the embedder alone's.

`agreement`: the labelled `--source` is split per class into a gallery (the first
`--gallery_per_class` images of each class) and queries (the rest, the first
`--queries` of them in a seeded order); the gallery is indexed with `--model`
(`kdml.index.build_index`), the search models are exported from it (float32
embedder, float16 and int8 galleries) and each query's top-1 is compared with the
exact index's top-1 of the same embedder's embeddings; Recall@1 (the top-1's class is
the query's) of both. Then the same in NumPy for the int8 gallery with the grid scale
`max|g| / 127` and with the stored score-aware scale, and the float gallery, each with
the float query and with the query rounded as the hybrid kernel does
(`hybrid_query_rounding`): which side of the int8 search costs what.

`open_set`: the threshold is calibrated on `--validation` (leave-one-out,
`kdml.evaluation.calibrate_threshold`) and applied to `--test` (default: a seeded half
of `--validation`'s classes, the other half calibrating), whose classes are split
in half: known classes (their first `--gallery_per_class` images in the gallery, the
rest queries) and unknown classes (queries only, absent from the gallery). Printed:
the precision and FAR achieved on the test queries against the targets, the recall of
the known queries, and the open-set accuracy (known queries accepted with the right
class, unknown queries rejected).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def _latency_ms(path: str, image_size: int, threads: int, runs: int) -> float:
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path, num_threads=threads)
    interpreter.allocate_tensors()
    (inp,) = interpreter.get_input_details()
    image = np.random.default_rng(0).integers(0, 255, (1, image_size, image_size, 3), np.uint8)
    times = []
    for i in range(runs + 3):
        interpreter.set_tensor(inp["index"], image)
        start = time.perf_counter()
        interpreter.invoke()
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 1000.0 * float(np.median(times))


def latency(args) -> list:
    import keras

    import kdml
    from kdml.export.exporter import export_embedder
    from kdml.export.search import append_search, encode_gallery

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for dim in args.dims:
            keras.utils.set_random_seed(args.seed)
            embedder = kdml.models.build_embedder("conv4", embedding_dim=dim,
                                                  image_size=args.image_size)
            path = export_embedder(embedder, os.path.join(tmp, f"d{dim}"), formats=("tflite",),
                                   quantizations=("float32",))["tflite_float32"]
            base = open(path, "rb").read()
            base_ms = _latency_ms(path, args.image_size, args.threads, args.runs)
            rows.append({"d": dim, "items": 0, "gallery": "none (embedder)",
                         "kb": len(base) / 1024, "ms": base_ms})
            rng = np.random.default_rng(args.seed)
            for size in args.sizes:
                gallery = rng.normal(size=(size, dim)).astype(np.float32)
                gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
                for dtype in ("float16", "int8"):
                    model = append_search(base, encode_gallery(gallery, dtype), args.k)
                    search_path = os.path.join(tmp, f"d{dim}_{size}_{dtype}.tflite")
                    with open(search_path, "wb") as f:
                        f.write(model)
                    ms = _latency_ms(search_path, args.image_size, args.threads, args.runs)
                    rows.append({"d": dim, "items": size, "gallery": dtype,
                                 "kb": len(model) / 1024, "ms": ms})
                    os.remove(search_path)
                    print(f"d={dim} items={size:,} {dtype}: {len(model) / 2**20:.1f} MiB, "
                          f"{ms:.2f} ms", file=sys.stderr)
    print(f"| d | gallery items | gallery storage | file size (KiB) | ms / image "
          f"({args.threads} thread{'s' if args.threads > 1 else ''}, batch 1, median) | "
          "search ms (minus embedder) |")
    print("|---:|---:|---|---:|---:|---:|")
    for row in rows:
        base_ms = next(r["ms"] for r in rows if r["d"] == row["d"] and r["items"] == 0)
        extra = "" if row["items"] == 0 else f"{row['ms'] - base_ms:.2f}"
        print(f"| {row['d']} | {row['items']:,} | {row['gallery']} | {row['kb']:,.0f} | "
              f"{row['ms']:.2f} | {extra} |")
    return rows


def _split(image_set, per_class: int):
    """(gallery rows, query rows): the first `per_class` images of each class, the rest."""
    gallery, queries = [], []
    for label in np.unique(image_set.labels):
        rows = np.flatnonzero(image_set.labels == label)
        gallery.extend(rows[:per_class])
        queries.extend(rows[per_class:])
    return np.asarray(gallery), np.asarray(queries)


def hybrid_query_rounding(queries) -> np.ndarray:
    """Float `(B, d)` queries as LiteRT's hybrid `FULLY_CONNECTED` sees them
    (`asymmetric_quantize_inputs`): each row quantized to int8 over `[min(q, 0), max(q, 0)]`
    (256 levels, zero point rounded and clipped to [-128, 127]) and dequantized."""
    q = np.asarray(queries, np.float64)
    low, high = np.minimum(q.min(axis=1), 0.0), np.maximum(q.max(axis=1), 0.0)
    scale = np.where(high > low, (high - low) / 255.0, 1.0)
    zero = np.clip(np.round(-128.0 - low / scale), -128, 127)
    codes = np.clip(np.round(q / scale[:, None]) + zero[:, None], -128, 127)
    return (codes - zero[:, None]) * scale[:, None]


def numpy_agreement(queries, gallery, exact_top1) -> dict:
    """Top-1 = `exact_top1` in NumPy for the int8 gallery with the grid scale
    `max|g| / 127` and with the stored score-aware scale, and the float gallery, each
    against the float query and the hybrid kernel's int8 query: which side costs what."""
    from kdml.export.search import decode_gallery, encode_gallery

    encoded = encode_gallery(gallery, "int8")
    step = np.maximum(np.abs(gallery).max(axis=1), 1e-12) / 127.0
    galleries = {"int8 grid scale max|g|/127": encoded["values"] * step[:, None],
                 "int8 score-aware scale": decode_gallery(encoded), "float32": gallery}
    out = {}
    for gallery_name, rows in galleries.items():
        for query_name, q in (("float query", queries),
                              ("int8 query", hybrid_query_rounding(queries))):
            out[f"numpy top-1 = exact top-1, {gallery_name} gallery, {query_name}"] = float(
                (np.argmax(q @ np.asarray(rows, np.float64).T, axis=1) == exact_top1).mean())
    return out


def agreement(args) -> dict:
    from ai_edge_litert.interpreter import Interpreter

    from kdml.embedding import (embed_image_set, image_subset, load_embedder, load_uint8,
                                model_fingerprint)
    from kdml.export.exporter import export_embedder
    from kdml.export.search import load_search_gallery
    from kdml.index import GalleryIndex
    from kdml.embedding import load_source

    image_set = load_source(args.source)
    gallery_rows, query_rows = _split(image_set, args.gallery_per_class)
    rng = np.random.default_rng(args.seed)
    query_rows = np.sort(rng.permutation(query_rows)[:args.queries])
    embedder = load_embedder(args.model)
    entry = model_fingerprint(embedder)
    gallery_set = image_subset(image_set, gallery_rows)
    names = np.asarray(image_set.class_names)
    results = {"gallery": int(len(gallery_rows)), "queries": int(len(query_rows))}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = args.output_dir or tmp
        os.makedirs(tmp, exist_ok=True)
        index = GalleryIndex(embed_image_set(embedder, gallery_set), names[gallery_set.labels],
                             gallery_set.paths, model=entry)
        index.save(os.path.join(tmp, "g.index"))
        load_search_gallery(os.path.join(tmp, "g.index"), entry)  # the export's checks pass
        index = GalleryIndex.load(os.path.join(tmp, "g.index"), backend="exact")
        queries = load_uint8(image_subset(image_set, query_rows), embedder.image_size[0])
        query_labels = names[image_set.labels[query_rows]]
        if args.output_dir:  # for a re-run in the TF-free kit
            np.save(os.path.join(tmp, "queries.npy"), queries)
        keras_top1 = index.query(embedder.embed(queries), k=1)
        results["recall@1 keras + exact index"] = float(
            (keras_top1.labels[:, 0] == query_labels).mean())
        for dtype in ("float16", "int8"):
            paths = export_embedder(args.model, os.path.join(tmp, dtype), formats=("tflite",),
                                    quantizations=("float32",),
                                    search={"index": index, "gallery_dtype": dtype, "k": 5,
                                            "model": entry})
            tflite_embeddings = load_embedder(paths["tflite_float32"]).embed(queries)
            exact = index.query(tflite_embeddings, k=2)
            runner = Interpreter(model_path=paths["search_float32"],
                                 num_threads=args.threads).get_signature_runner("search")
            found = np.concatenate([runner(images=queries[i:i + 64])["indices"][:, 0]
                                    for i in range(0, len(queries), 64)])
            same = found == exact.indices[:, 0]
            if args.output_dir:
                np.save(os.path.join(tmp, f"{dtype}_top1.npy"), found)
            margin = exact.similarities[:, 0] - exact.similarities[:, 1]
            results[f"{dtype} top-1 = exact top-1"] = float(same.mean())
            results[f"{dtype} disagreements: median top-1/top-2 margin"] = (
                float(np.median(margin[~same])) if (~same).any() else None)
            results[f"{dtype} recall@1"] = float((index.labels[found] == query_labels).mean())
            results["recall@1 tflite float32 + exact index"] = float(
                (exact.labels[:, 0] == query_labels).mean())
            results[f"{dtype} search file KiB"] = os.path.getsize(paths["search_float32"]) / 1024
        results.update(numpy_agreement(tflite_embeddings, index.embeddings, exact.indices[:, 0]))
    for name, value in results.items():
        print(f"{name}: {value:.4f}" if isinstance(value, float) else f"{name}: {value}")
    return results


def open_set(args) -> dict:
    from kdml.embedding import embed_image_set, image_subset, load_embedder
    from kdml.evaluation.threshold import calibrate_threshold
    from kdml.evaluation.verification import count_negatives, normalized_rows
    from kdml.index import GalleryIndex
    from kdml.embedding import load_source

    embedder = load_embedder(args.model)
    validation = load_source(args.validation)
    if args.test is None:  # one source: its classes split in half, seeded
        order = np.random.default_rng(args.seed + 1).permutation(validation.num_classes)
        halves = np.isin(validation.labels, order[: validation.num_classes // 2])
        test = image_subset(validation, np.flatnonzero(~halves))
        validation = image_subset(validation, np.flatnonzero(halves))
    else:
        test = load_source(args.test)
    calibration = calibrate_threshold(
        embed_image_set(embedder, validation), validation.labels,
        target_precision=args.target_precision, target_far=args.target_far)
    threshold = np.float32(calibration["threshold"])
    classes = np.random.default_rng(args.seed).permutation(np.unique(test.labels))
    known = np.zeros(len(test.class_names), bool)
    known[classes[: len(classes) // 2]] = True
    embeddings = embed_image_set(embedder, test)
    gallery_rows, query_rows = _split(test, args.gallery_per_class)
    gallery_rows = gallery_rows[known[test.labels[gallery_rows]]]
    names = np.asarray(test.class_names)
    index = GalleryIndex(embeddings[gallery_rows], names[test.labels[gallery_rows]])
    top1 = index.query(embeddings[query_rows], k=1)
    query_known = known[test.labels[query_rows]]
    correct = top1.labels[:, 0] == names[test.labels[query_rows]]
    accept = top1.similarities[:, 0] >= threshold
    # FAR over the test set's impostor pairs (all test images), as calibrated
    x = normalized_rows(embeddings)
    _, at_or_above, negatives = count_negatives(x, test.labels, [threshold])
    report = {
        "threshold": float(threshold), "target": calibration["target"],
        "validation": {k: calibration[k] for k in ("precision", "recall", "far", "queries")},
        "test_queries": int(len(query_rows)), "known_queries": int(query_known.sum()),
        "unknown_queries": int((~query_known).sum()),
        "accepted queries": int(accept.sum()),
        "precision": (float((accept & correct).sum() / accept.sum()) if accept.any()
                      else "n/a (nothing accepted)"),
        "far (test impostor pairs)": float(at_or_above[0] / negatives),
        "recall (known queries)": float((accept & correct)[query_known].mean()),
        "unknown rejected": float((~accept)[~query_known].mean()),
        "open-set accuracy": float(np.where(query_known, accept & correct, ~accept).mean()),
        "closed-set recall@1 (known queries)": float(correct[query_known].mean()),
    }
    for name, value in report.items():
        print(f"{name}: {value}")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("latency")
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1000, 10000, 100000])
    p.add_argument("--dims", type=lambda s: [int(x) for x in s.split(",")], default=[128, 512])
    p.add_argument("--image_size", type=int, default=28)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("agreement")
    p.add_argument("--model", required=True)
    p.add_argument("--source", required=True)
    p.add_argument("--gallery_per_class", type=int, default=5)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--output_dir", default=None,
                   help="keep the search models, queries.npy and each file's top-1 here")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("open_set")
    p.add_argument("--model", required=True)
    p.add_argument("--validation", required=True)
    p.add_argument("--test", default=None,
                   help="default: the other half of --validation's classes (seeded)")
    p.add_argument("--target_precision", type=float, default=None)
    p.add_argument("--target_far", type=float, default=None)
    p.add_argument("--gallery_per_class", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    return {"latency": latency, "agreement": agreement, "open_set": open_set}[args.command](args)


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
