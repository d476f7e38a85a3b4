"""Gallery-index benchmark: exact vs approximate search on embedding-like vectors.

    python tools/bench_index.py                      # 1,000,000 x 128 gallery, 10,000 queries
    python tools/bench_index.py --noise=1.5          # the hard case: noisier, isotropic
    python tools/bench_index.py --gallery=100000     # a quicker run

Data (seeded, `numpy.random.default_rng(--seed)`), clustered at two levels like a
trained embedder's unit vectors (classes inside coarse categories, as SOP's products
inside its 12 categories): `--groups` group centres uniform on the unit sphere of R^d;
`--classes` class centres, each a group centre plus Gaussian noise of norm about
`--class_spread`, normalised; every gallery vector and query a class centre plus noise
of norm about `--noise`, normalised (noise of norm s: per-dimension std s / sqrt(d)).
Gallery vectors are split evenly over the classes; queries come from random classes
with fresh noise.

Prints, at the built size: the approximate backend's build time (k-means + adding +
nprobe calibration), its recall@10 against the exact top-10 over all queries,
queries/s of exact search (`kdml.evaluation.exact_knn`, float32) and of the
approximate backend, and the process's peak memory (RSS high-water mark).

Ground truth: the exact top-10 of every query. The timed exact search runs on the
first `--exact_queries` queries (queries/s does not depend on their number beyond a
block); the remaining ground truth comes from faiss `IndexFlatIP` (exact, BLAS), and
both exact searches are checked to agree on the timed queries.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402


def embedding_like(rng, centres, count, noise):
    labels = rng.integers(len(centres), size=count)
    return _noisy(rng, centres, labels, noise), labels


def _noisy(rng, centres, labels, noise, block=100_000):
    d = centres.shape[1]
    out = np.empty((len(labels), d), np.float32)
    for start in range(0, len(labels), block):
        part = labels[start:start + block]
        x = centres[part] + rng.standard_normal((len(part), d), dtype=np.float32) * (
            noise / np.sqrt(d))
        out[start:start + block] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gallery", type=int, default=1_000_000)
    parser.add_argument("--queries", type=int, default=10_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--classes", type=int, default=10_000)
    parser.add_argument("--groups", type=int, default=100)
    parser.add_argument("--class_spread", type=float, default=1.0)
    parser.add_argument("--noise", type=float, default=1.0)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--exact_queries", type=int, default=1_000,
                        help="queries timed with kdml's exact search")
    parser.add_argument("--nlist", type=int, default=None)
    parser.add_argument("--nprobe", type=int, default=None)
    parser.add_argument("--target_recall", type=float, default=0.97)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args(argv)

    import faiss

    from kdml.evaluation import exact_knn
    from kdml.index.backends import FaissBackend, sample_recall

    rng = np.random.default_rng(args.seed)
    groups = rng.standard_normal((args.groups, args.dim), dtype=np.float32)
    groups /= np.linalg.norm(groups, axis=1, keepdims=True)
    centres = _noisy(rng, groups, rng.integers(args.groups, size=args.classes),
                     args.class_spread)
    gallery = _noisy(rng, centres, np.arange(args.gallery) % args.classes, args.noise)
    queries, query_labels = embedding_like(rng, centres, args.queries, args.noise)
    threads = faiss.omp_get_max_threads()
    print(f"gallery {args.gallery:,} x {args.dim}, {args.queries:,} queries, {args.classes:,} "
          f"classes in {args.groups} groups, class spread {args.class_spread}, noise "
          f"{args.noise}; {os.cpu_count()} CPU cores, faiss threads {threads}",
          flush=True)

    timed = queries[:args.exact_queries]
    exact_knn(timed[:64], gallery, k=args.k, similarity="inner_product")  # trace / warm up
    start = time.perf_counter()
    exact_idx, _ = exact_knn(timed, gallery, k=args.k, similarity="inner_product")
    exact_seconds = time.perf_counter() - start
    exact_qps = len(timed) / exact_seconds
    print(f"exact (kdml exact_knn): {len(timed):,} queries in {exact_seconds:.1f} s = "
          f"{exact_qps:,.0f} queries/s", flush=True)

    start = time.perf_counter()
    flat = faiss.IndexFlatIP(args.dim)
    flat.add(gallery)
    _, truth = flat.search(queries, args.k)
    flat_seconds = time.perf_counter() - start
    del flat
    agree = sample_recall(truth[:len(timed)], exact_idx, args.k)
    class_recall = float(np.mean(truth[:, 0] % args.classes == query_labels))
    print(f"the data: class Recall@1 {100 * class_recall:.1f} % (exact nearest neighbour of "
          "the query's class)", flush=True)
    print(f"ground truth (faiss IndexFlatIP): {flat_seconds:.1f} s = "
          f"{args.queries / flat_seconds:,.0f} queries/s; agrees with kdml on "
          f"{100 * agree:.2f} % of the timed top-{args.k}", flush=True)

    backend = FaissBackend(nlist=args.nlist, nprobe=args.nprobe,
                           target_recall=args.target_recall, calibration_k=args.k)
    start = time.perf_counter()
    backend.build(gallery, seed=args.seed)
    build_seconds = time.perf_counter() - start
    print(f"faiss IVF-Flat build: nlist {backend.nlist}, nprobe {backend.nprobe} "
          f"(calibrated recall {backend.calibrated_recall}), {build_seconds:.1f} s", flush=True)
    backend.search(queries[:100], args.k)  # warm up
    start = time.perf_counter()
    approx_idx, _ = backend.search(queries, args.k)
    approx_seconds = time.perf_counter() - start
    approx_qps = args.queries / approx_seconds
    recall = sample_recall(approx_idx, truth, args.k)
    sweep = {}
    for nprobe in sorted({max(1, backend.nprobe // 2), backend.nprobe, 2 * backend.nprobe}):
        backend._index.nprobe = nprobe
        start = time.perf_counter()
        found, _ = backend.search(queries, args.k)
        seconds = time.perf_counter() - start
        sweep[nprobe] = (sample_recall(found, truth, args.k), args.queries / seconds)
    result = {
        "gallery": args.gallery, "queries": args.queries, "dim": args.dim,
        "classes": args.classes, "groups": args.groups,
        "class_spread": args.class_spread, "noise": args.noise, "k": args.k, "seed": args.seed,
        "class_recall_at_1": class_recall, "exact_qps": exact_qps, "exact_timed_queries": len(timed),
        "faiss_flat_qps": args.queries / flat_seconds,
        "approx": {"backend": "faiss IVF-Flat", "nlist": backend.nlist,
                   "nprobe": backend.nprobe, "build_s": build_seconds,
                   "recall_at_k": recall, "qps": approx_qps},
        "speedup": approx_qps / exact_qps, "nprobe_sweep": sweep,
        "peak_rss_gib": peak_rss_gib(),
    }
    print(f"\n| search | recall@{args.k} vs exact | queries/s | build s |")
    print("|---|---:|---:|---:|")
    print(f"| exact, kdml `exact_knn` (float32) | 1.0000 | {exact_qps:,.0f} | 0 |")
    print(f"| faiss IVF{backend.nlist},Flat nprobe={backend.nprobe} | {recall:.4f} | "
          f"{approx_qps:,.0f} | {build_seconds:.1f} |")
    for nprobe, (r, qps) in sweep.items():
        print(f"|   nprobe={nprobe} | {r:.4f} | {qps:,.0f} | |")
    print(f"\napproximate / exact queries/s: {approx_qps / exact_qps:.1f}x; "
          f"peak RSS {result['peak_rss_gib']:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
