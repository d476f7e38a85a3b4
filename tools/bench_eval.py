"""Benchmark of kdml's evaluation against a plain NumPy k-NN, at Stanford Online Products scale.

Clustered random embeddings shaped like SOP's test set (60,502 x 512, 11,316 classes
of 2 or more images, L2-normalised, Recall@1 around 0.8) and, for the 10x case, 60,502
queries against a 10x gallery of 605,020 (the queries' classes plus distractor
classes). Each measurement runs in a fresh subprocess, so its peak RSS
(`resource.getrusage(...).ru_maxrss`, the process's high-water mark, TensorFlow's
allocations included) is its own:

    numpy_knn     full similarity in query chunks (`q @ g.T`, 2,048 rows) + argpartition
                  of the k largest + sort of those k: the straightforward baseline
    kdml_knn      `kdml.evaluation.knn._knn` (blocked tiles, running top-k)
    kdml_ranking  `retrieval_metrics(..., nmi=False)`: k-NN + Recall@K, Precision@K,
                  MAP@R, R-Precision
    kdml_all      `retrieval_metrics(..., nmi=True, ami=True)`: the above + k-means
                  NMI / AMI

Usage:
    python tools/bench_eval.py                          # SOP scale, all cases
    python tools/bench_eval.py --cases=numpy_knn,kdml_knn --scale=0.25
    python tools/bench_eval.py --gallery_factor=10 --query_fraction=0.1 --cases=numpy_knn,kdml_knn
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import numpy as np

SOP_IMAGES, SOP_CLASSES, SOP_DIM = 60_502, 11_316, 512
CASES = ("numpy_knn", "kdml_knn", "kdml_ranking", "kdml_all")


def clustered_embeddings(num_images, num_classes, dim, *, noise=0.095, seed=0):
    """`(N, dim)` float32 unit rows and `(N,)` labels; every class has >= 2 images."""
    rng = np.random.default_rng(seed)
    sizes = 2 + rng.multinomial(num_images - 2 * num_classes, np.full(num_classes, 1 / num_classes))
    labels = np.repeat(np.arange(num_classes), sizes)
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = centres[labels] + noise * rng.standard_normal((num_images, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    order = rng.permutation(num_images)
    return x[order], labels[order]


def make_data(scale, gallery_factor, query_fraction, seed=0):
    """Queries, their labels, and the gallery (None: leave-one-out) with its labels."""
    n = int(round(SOP_IMAGES * scale))
    c = int(round(SOP_CLASSES * scale))
    if gallery_factor == 1:
        x, labels = clustered_embeddings(n, c, SOP_DIM, seed=seed)
        return x, labels, None, None
    # gallery: the SOP-like set plus (factor - 1) x as many distractor images
    x, labels = clustered_embeddings(n * gallery_factor, c * gallery_factor, SOP_DIM, seed=seed)
    rng = np.random.default_rng(seed + 1)
    queries = rng.choice(len(x), size=int(round(n * query_fraction)), replace=False)
    noise = 0.095 * rng.standard_normal((len(queries), SOP_DIM), dtype=np.float32)
    q = x[queries] + noise  # a new view of a gallery item's class
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return q, labels[queries], x, labels


def numpy_knn(queries, gallery, k, exclude_self, chunk=2048):
    """Baseline: (chunk, N) similarities, argpartition, then sort the k kept."""
    indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        sims = queries[start:start + chunk] @ gallery.T
        if exclude_self:
            rows = np.arange(sims.shape[0])
            sims[rows, start + rows] = -np.inf
        top = np.argpartition(-sims, k - 1, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(sims, top, axis=1), axis=1, kind="stable")
        indices[start:start + chunk] = np.take_along_axis(top, order, axis=1)
    return indices


def run_case(case, args):
    """One measurement in this process; returns its result dict."""
    q, q_labels, g, g_labels = make_data(args.scale, args.gallery_factor, args.query_fraction)
    leave_one_out = g is None
    ks = tuple(int(k) for k in args.ks.split(","))
    k = max(ks)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    start = time.perf_counter()
    if case == "numpy_knn":
        numpy_knn(q, q if leave_one_out else g, k, leave_one_out)
        metrics = {}
    else:
        import_start = time.perf_counter()
        import tensorflow as tf  # noqa: F401  (imports are timed apart: a one-off cost)
        import tensorflow_similarity.retrieval_metrics  # noqa: F401

        from kdml.evaluation import retrieval_metrics
        from kdml.evaluation.knn import _knn

        import_seconds = time.perf_counter() - import_start

        budget = int(args.max_memory_mib * 2**20)
        start = time.perf_counter()
        if case == "kdml_knn":
            _knn(q, g, k=k, max_memory_bytes=budget, return_similarities=False,
                 precision=args.precision)
            metrics = {}
        else:
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                metrics = retrieval_metrics(
                    q, q_labels, ks=ks, nmi=case == "kdml_all", ami=case == "kdml_all",
                    max_memory_bytes=budget, gallery=g, gallery_labels=g_labels,
                    precision_ks=ks, n_init=1, kmeans_max_iter=args.kmeans_max_iter,
                    knn_precision=args.precision)
    seconds = time.perf_counter() - start
    if case == "numpy_knn":
        import_seconds = 0.0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    return {"case": case, "seconds": seconds, "peak_rss_gib": peak,
            "rss_before_gib": rss_before, "import_seconds": import_seconds, "queries": len(q),
            "gallery": len(q) if leave_one_out else len(g), "k": k, "metrics": metrics}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(CASES))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's size")
    parser.add_argument("--gallery_factor", type=int, default=1,
                        help="1: leave-one-out; 10: queries vs a 10x gallery")
    parser.add_argument("--query_fraction", type=float, default=1.0,
                        help="queries of the gallery case, as a fraction of 60,502 x scale")
    parser.add_argument("--ks", default="1,10,100,1000")
    parser.add_argument("--max_memory_mib", type=float, default=256)
    parser.add_argument("--precision", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--kmeans_max_iter", type=int, default=300)
    parser.add_argument("--output", default=None, help="JSON file of the results")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    print(f"machine: {os.cpu_count()} CPU cores visible; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    results = []
    for case in args.cases.split(","):
        command = [sys.executable, __file__, f"--case={case}"] + [
            a for a in sys.argv[1:] if not a.startswith(("--cases", "--output"))]
        out = subprocess.run(command, capture_output=True, text=True, check=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
        result = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(result)
        print(f"{case:13s} {result['queries']:>8,} x {result['gallery']:>8,}  k={result['k']:<5} "
              f"{result['seconds']:8.1f} s (+{result['import_seconds']:.0f} s imports)  peak RSS {result['peak_rss_gib']:.2f} GiB  "
              f"{json.dumps({m: round(v, 4) for m, v in result['metrics'].items()})}",
              flush=True)
    base = next((r["seconds"] for r in results if r["case"] == "numpy_knn"), None)
    if base:
        for r in results:
            print(f"  {r['case']:13s} time / numpy_knn = {r['seconds'] / base:.2f}")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
