"""Evaluation benchmark at Stanford Online Products size: kdml's metrics against the
fastest bare product pass that fits the memory budget.

Synthetic SOP-shaped data: 60,502 x 512 float32, 12,100 classes of 2 to 12 images
(SOP's class sizes), clustered (class centres + Gaussian noise, L2-normalised) so that
the metrics are far from 0 and 1. Leave-one-out. Each case runs in a fresh subprocess,
so its peak memory is its own: the RSS high-water mark (`VmHWM`, TensorFlow's
allocations and the data included) counted from after the data generation:

    tf_bare@B     the blocked float32 product pass alone: `tf.linalg.matmul` of each
                  block of B query rows against the whole gallery stored transposed
                  `(d, M)`, no selection; one case per B of `--bare_rows` (256 to 4,096).
                  The limit of any exact method is the fastest of these and of the
                  numpy_bare@B cases whose peak RSS is within `--peak_budget_gb` (1.5 GB,
                  decimal: the whole process, its libraries and the data included, as for
                  kdml); the summary also gives the ratio to the fastest at any memory
    tf_bare_transpose_b
                  `matmul(block, gallery, transpose_b=True)` on the `(M, d)` gallery, at
                  kdml's block rows (kdml's product before it stored `G^T`)
    numpy_bare@B  the same pass with NumPy / OpenBLAS (`q @ g.T` into one preallocated
                  `(B, M)` buffer; no TensorFlow in the process), one case per B of
                  `--bare_rows`: another library's bare pass, a candidate for the limit
    faiss_ip10    faiss `IndexFlatIP`, k = 10 (+1 for the query itself)
    kdml_ranking  `retrieval_metrics(x, labels, ks=(1, 10, 100, 1000), nmi=False)`:
                  Recall@1/10/100/1000, MAP@R, R-Precision in one pass
    kdml_nmi      `kmeans_scores` (TensorFlow k-means, k = classes, the defaults) + NMI,
                  as `retrieval_metrics(..., nmi=True)` adds it

Times are wall clock and process CPU time (user + system). The cases run `--repeats`
times, interleaved (all cases, then all cases again), and each case's best wall and best
CPU time are reported: on a shared or throttled machine the best of several interleaved
runs is the least disturbed one. Memory: the peak over the repeats, and its part above
the process's RSS when the call starts (TensorFlow and tensorflow-similarity loaded,
the data made): "own". The summary gives every case's ratio to the limit.

Usage:
    python tools/bench_eval.py                    # SOP size, default cases, best of 3
    python tools/bench_eval.py --scale=0.25 --repeats=2      # quick check
    python tools/bench_eval.py --cases=tf_bare,kdml_ranking  # the ratio alone
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

SOP_IMAGES, SOP_CLASSES, SOP_DIM = 60_502, 12_100, 512
CASES = ("tf_bare", "tf_bare_transpose_b", "numpy_bare", "faiss_ip10", "kdml_ranking", "kdml_nmi")
DEFAULT_CASES = ("tf_bare", "numpy_bare", "kdml_ranking", "kdml_nmi")
BARE_ROWS = (256, 512, 1024, 2048, 4096)
KS = (1, 10, 100, 1000)


def sop_like_embeddings(num_images, num_classes, dim, *, noise=0.11, seed=0):
    """`(N, dim)` float32 unit rows and `(N,)` labels: class sizes 2..12, mean N / C."""
    rng = np.random.default_rng(seed)
    mean_extra = num_images / num_classes - 2
    sizes = 2 + rng.binomial(10, min(1.0, mean_extra / 10), size=num_classes)
    while sizes.sum() != num_images:  # nudge sizes within [2, 12] to the exact total
        step = 1 if sizes.sum() < num_images else -1
        movable = np.flatnonzero((sizes < 12) if step > 0 else (sizes > 2))
        chosen = rng.choice(movable, size=min(len(movable), abs(num_images - sizes.sum())),
                            replace=False)
        sizes[chosen] += step
    order = rng.permutation(num_images)
    labels = np.repeat(np.arange(num_classes), sizes)[order]
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    x = rng.standard_normal((num_images, dim), dtype=np.float32)  # in place: one (N, d) array
    x *= noise
    x += centres[labels]
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x, labels


def _reset_peak_rss():
    """Restart the kernel's peak-RSS count (Linux `clear_refs` 5) so that the peak read
    after a call is the call's, not the data generation's; False where unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_gib():
    """Peak RSS since the last reset (`VmHWM`), else the process's (`getrusage`)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**20  # kB -> GiB
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def _rss_gib():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def _block_rows(num_gallery, max_memory_bytes):
    """kdml's query rows per block (`kdml.evaluation.ranking._block_rows`: two float32
    strips in the budget, at most 256 rows, a multiple of 64), without importing
    TensorFlow."""
    width = -(-num_gallery // 64) * 64  # the gallery padded to kdml's group size (SOP)
    rows = max_memory_bytes // (2 * 4 * width)
    rows = rows // 64 * 64 if rows >= 64 else rows
    return int(max(1, min(num_gallery, 256, rows)))


def run_case(case, args):
    """One measurement in this process; returns its result dict."""
    n = int(round(SOP_IMAGES * args.scale))
    x, labels = sop_like_embeddings(n, int(round(SOP_CLASSES * args.scale)), SOP_DIM)
    budget = int(args.max_memory_mib * 2**20)
    metrics = {}
    case, _, bare_rows = case.partition("@")
    if case not in ("numpy_bare", "faiss_ip10"):
        import tensorflow as tf  # noqa: F401  (loaded before the baseline RSS is read)
        import tensorflow_similarity.retrieval_metrics  # noqa: F401  (a one-off import, untimed)
    _reset_peak_rss()  # the data generation's temporaries are not the method's
    baseline = _rss_gib()
    if case == "numpy_bare":
        block = int(bare_rows) if bare_rows else _block_rows(n, budget)
        out = np.empty((block, n), np.float32)
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        for start in range(0, n, block):
            rows = x[start:start + block]
            np.matmul(rows, x.T, out=out[: len(rows)])
    elif case == "faiss_ip10":
        import faiss

        start_wall, start_cpu = time.perf_counter(), time.process_time()
        index = faiss.IndexFlatIP(SOP_DIM)
        index.add(x)
        _, found = index.search(x, 11)
        hits = labels[found[:, 1:2]] == labels[:, None]
        metrics = {"recall@1": float(hits.mean())}
    else:
        import tensorflow as tf

        from kdml.evaluation import retrieval_metrics
        from kdml.evaluation.metrics import kmeans_scores

        if case in ("tf_bare", "tf_bare_transpose_b"):
            block = int(bare_rows) if bare_rows else _block_rows(n, budget)
            transpose_b = case == "tf_bare_transpose_b"
            gallery = tf.constant(x) if transpose_b else tf.transpose(tf.constant(x))

            @tf.function
            def product(rows):
                return tf.linalg.matmul(rows, gallery, transpose_b=transpose_b)[0, 0]

            product(tf.constant(x[:block]))  # trace outside the timing
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            for start in range(0, n, block):
                rows = tf.constant(x[start:start + block])  # no second (N, d) copy held
                if rows.shape[0] < block:
                    rows = tf.pad(rows, [[0, block - rows.shape[0]], [0, 0]])
                product(rows).numpy()
        elif case == "kdml_ranking":
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            metrics = dict(retrieval_metrics(x, labels, ks=KS, nmi=False,
                                             max_memory_bytes=budget))
        elif case == "kdml_nmi":
            classes, class_of_item = np.unique(labels, return_inverse=True)
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            scores, settings = kmeans_scores(x, class_of_item, len(classes), seed=0,
                                             max_iter=args.kmeans_max_iter,
                                             max_memory_bytes=budget, return_settings=True)
            metrics = dict(scores, settings=settings)
        else:
            raise ValueError(f"Unknown case {case!r}; expected one of {CASES}.")
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    peak = _peak_rss_gib()
    if bare_rows:
        case = f"{case}@{bare_rows}"
    return {"case": case, "seconds": wall, "cpu_seconds": cpu, "peak_rss_gib": peak,
            "baseline_rss_gib": baseline, "own_peak_gib": peak - baseline,
            "process_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
            "images": n, "metrics": metrics}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES),
                        help=f"comma-separated, of {', '.join(CASES)} (tf_bare, numpy_bare: one "
                             "case per --bare_rows, or tf_bare@B for one)")
    parser.add_argument("--bare_rows", default=",".join(map(str, BARE_ROWS)),
                        help="query rows per block of the tf_bare and numpy_bare cases")
    parser.add_argument("--peak_budget_gb", type=float, default=1.5,
                        help="peak RSS (decimal GB, whole process) a bare pass must stay "
                             "within to count as the limit")
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of SOP's size")
    parser.add_argument("--max_memory_mib", type=float, default=256)
    parser.add_argument("--kmeans_max_iter", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved runs of every case; the best time is reported")
    parser.add_argument("--output", default=None, help="JSON file of the results")
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)  # subprocess mode
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case, args)))
        return
    print(f"machine: {os.cpu_count()} CPU cores visible; load average "
          f"{os.getloadavg()[0]:.1f}", flush=True)
    cases = []
    for case in args.cases.split(","):
        if case in ("tf_bare", "numpy_bare"):
            cases += [f"{case}@{int(rows)}" for rows in args.bare_rows.split(",")]
        elif case.partition("@")[0] in CASES:
            cases.append(case)
        else:
            parser.error(f"--cases: unknown case {case!r}; expected some of {', '.join(CASES)}")
    budget = int(args.max_memory_mib * 2**20)
    n = int(round(SOP_IMAGES * args.scale))
    print(f"{n:,} x {SOP_DIM}, leave-one-out; kdml's blocks: {_block_rows(n, budget)} rows "
          f"(--max_memory_mib={args.max_memory_mib:g}); {args.repeats} interleaved rounds",
          flush=True)
    runs = {}
    for repeat in range(args.repeats):
        for case in cases:
            command = [sys.executable, __file__, f"--case={case}"] + [
                a for a in sys.argv[1:] if not a.startswith(("--cases", "--output", "--repeats"))]
            out = subprocess.run(command, capture_output=True, text=True,
                                 env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
            if out.returncode:
                print(f"{case}: failed\n{out.stderr[-2000:]}", flush=True)
                continue
            result = json.loads(out.stdout.strip().splitlines()[-1])
            runs.setdefault(case, []).append(result)
            shown = {m: (round(v, 4) if isinstance(v, float) else v)
                     for m, v in result["metrics"].items()}
            print(f"[{repeat + 1}/{args.repeats}] {case:19s} {result['images']:>7,} x "
                  f"{result['images']:>7,}  wall {result['seconds']:7.1f} s  "
                  f"cpu {result['cpu_seconds']:7.1f} s  peak RSS {result['peak_rss_gib']:.2f} GiB "
                  f"(own {result['own_peak_gib']:.2f})  {json.dumps(shown)}  "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
    results = []
    for case, case_runs in runs.items():
        best = dict(case_runs[0])
        best.update(seconds=min(r["seconds"] for r in case_runs),
                    cpu_seconds=min(r["cpu_seconds"] for r in case_runs),
                    peak_rss_gib=max(r["peak_rss_gib"] for r in case_runs),
                    own_peak_gib=max(r["own_peak_gib"] for r in case_runs),
                    repeats=len(case_runs), runs=case_runs)
        results.append(best)
    print(f"best of {args.repeats} (wall and CPU each), peak RSS the highest:")
    for r in results:
        print(f"  {r['case']:19s} wall {r['seconds']:7.1f} s  cpu {r['cpu_seconds']:7.1f} s  "
              f"peak RSS {r['peak_rss_gib']:.2f} GiB = {r['peak_rss_gib'] * 2**30 / 1e9:.2f} GB "
              f"(own {r['own_peak_gib']:.2f} GiB)")
    by_case = {r["case"]: r for r in results}
    # the limit: the fastest bare pass of any library and block size within the budget
    bare = [r for r in results if r["case"].startswith(("tf_bare@", "numpy_bare@"))]
    within = [r for r in bare if r["peak_rss_gib"] * 2**30 / 1e9 <= args.peak_budget_gb]
    limit = min(within, key=lambda r: r["seconds"]) if within else None
    if bare:
        fastest = min(bare, key=lambda r: r["seconds"])
        print(f"  fastest bare pass: {fastest['case']} ({fastest['seconds']:.1f} s); within "
              f"{args.peak_budget_gb:g} GB peak: "
              + (f"{limit['case']} ({limit['seconds']:.1f} s), the limit" if limit else "none")
              + "; over the budget: "
              + (", ".join(r["case"] for r in bare if r not in within) or "none"))
    if limit:
        for r in results:
            print(f"  {r['case']:19s} / limit: wall {r['seconds'] / limit['seconds']:.2f}x, "
                  f"cpu {r['cpu_seconds'] / limit['cpu_seconds']:.2f}x")
    if "kdml_ranking" in by_case:
        ranking = by_case["kdml_ranking"]
        peak_gb = ranking["peak_rss_gib"] * 2**30 / 1e9
        verdict = ("within" if peak_gb <= args.peak_budget_gb else "OVER")
        ratio = f"{ranking['seconds'] / limit['seconds']:.2f}x the limit, " if limit else ""
        if bare:
            ratio += f"{ranking['seconds'] / fastest['seconds']:.2f}x the fastest at any memory, "
        print(f"kdml_ranking: {ranking['seconds']:.1f} s, {ratio}peak {peak_gb:.2f} GB "
              f"({verdict} {args.peak_budget_gb:g} GB)")
    if "kdml_ranking" in by_case and "kdml_nmi" in by_case:
        ranking, nmi = by_case["kdml_ranking"], by_case["kdml_nmi"]
        print(f"kdml_nmi: NMI {nmi['metrics'].get('nmi', float('nan')):.4f} in "
              f"{nmi['seconds']:.1f} s = {nmi['seconds'] / ranking['seconds']:.2f}x "
              f"kdml_ranking (cpu {nmi['cpu_seconds'] / ranking['cpu_seconds']:.2f}x)")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
