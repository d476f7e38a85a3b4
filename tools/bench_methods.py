"""Method comparison on Omniglot: every method, same backbone and budget, 3 seeds.

Trains each row of `ROWS` with `python -m kdml.train` on the 5 alphabets of
`images_background_small1` (136 characters, all classes train) and evaluates on the
alphabets only `images_background_small2` has, Japanese_(katakana), Sanskrit and
Tagalog (106 unseen characters, 2,120 images): Recall@1 and MAP@R over all of them
(`metrics.json` "final" of the run), and the 20-way within-alphabet one-shot accuracy
of Lake et al. (`kdml.evaluation.few_shot_accuracy`, 1,000 episodes, groups = alphabet).
Tagalog has only 17 characters, so the 20-way episodes come from Japanese_(katakana)
(47) and Sanskrit (42). Every row uses `conv4` at 28 px, P x K = 32 x 4 and the same
number of epochs (`BUDGET`), seeds 0, 1, 2.

Each finished run is cached as JSON in
`<runs_dir>/<row>/seed<k>/result-<key>.json`, the key holding the budget and a hash
of the row's flags, so rows and seeds can be run separately (`--rows`, `--seeds`) and
a rerun skips what is done; `--table_only` aggregates whatever is there. The table
(markdown) gives mean +- sample std over seeds and the wall time per run (start-up,
initial and final evaluation included).

    python tools/bench_methods.py [--rows=proxy_anchor,so_proxy] [--seeds=0,1,2]
        [--omniglot_dir=../shared/data/omniglot] [--cache_dir=/tmp/kdml_omniglot]
        [--runs_dir=runs/bench_methods] [--table_only]

Adding a method: one line in `ROWS`, `"name": Row(flags=("--method=name", ...))`;
`rerank_top_k=k` also reports PDDM re-ranked Recall@1 of the top k neighbours
(`kdml.evaluation.rerank.rerank_metrics` with the run's `pddm.keras`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
import time
import zipfile
from typing import Dict, List, NamedTuple, Sequence, Tuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from kdml.config import TrainConfig  # noqa: E402  (no TensorFlow import)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Row(NamedTuple):
    """A table row: extra `kdml.train` flags, and an optional re-ranking top-k."""

    flags: Tuple[str, ...]
    rerank_top_k: int = 0


def _so(strength: float) -> Row:
    return Row(flags=("--method=so_proxy", f"--so_strength={float(strength)}"))


ROWS: Dict[str, Row] = {
    "proxy_anchor": Row(flags=("--method=proxy_anchor",)),
    # The default strength spelled out, so the cache key follows the default.
    "so_proxy": _so(TrainConfig.so_strength),
    # SO strength sweep (the default --so_strength is chosen from these rows).
    "so_proxy_s1": _so(1.0),
    "so_proxy_s10": _so(10.0),
    "so_proxy_s100": _so(100.0),
    # Rows of other methods (one line each) go below this comment.
    "multi_similarity": Row(flags=("--method=multi_similarity",)),  # CRT's base loss alone
    "crt": Row(flags=("--method=crt", "--base_loss=ms")),  # CRT defaults: kdml.config "crt" block
    # PDDM: retrieval by the embedding (Recall@1, MAP@R, one-shot) and, same runs, each
    # query's top 8 re-ranked by the trained unit (re-ranked R@1); defaults: "PDDM" block.
    "pddm": Row(flags=("--method=pddm",), rerank_top_k=8),
    "pddm_single": Row(flags=("--method=pddm", "--pddm_mining=single"), rerank_top_k=8),
}

# The shared budget of every row: backbone, input size, batch geometry, epochs.
BUDGET = dict(backbone="conv4", image_size=28, classes_per_batch=32, images_per_class=4,
              epochs=8, embedding_dim=512)

TRAIN_ZIP = "images_background_small1"
EVAL_ZIP = "images_background_small2"
EVAL_ALPHABETS = ("Japanese_(katakana)", "Sanskrit", "Tagalog")
N_WAY, EPISODES = 20, 1000

FLAGS = flags.FLAGS


def _define_flags():
    """Defined only when run as a script, so importing this module (tests) adds no flags."""
    flags.DEFINE_list("rows", ["proxy_anchor", "so_proxy"], "Rows of ROWS to run.")
    flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds to run.")
    flags.DEFINE_string("omniglot_dir", os.path.join(ROOT, "..", "shared", "data", "omniglot"),
                        "Folder holding images_background_small{1,2}.zip.")
    flags.DEFINE_string("cache_dir", os.path.join("/tmp", "kdml_omniglot"),
                        "Where the zips are unpacked (once).")
    flags.DEFINE_string("runs_dir", os.path.join(ROOT, "runs", "bench_methods"),
                        "Training runs and cached results, <runs_dir>/<row>/seed<k>/.")
    flags.DEFINE_integer("epochs", BUDGET["epochs"], "Epochs of every run (part of the cache key).")
    flags.DEFINE_bool("table_only", False, "Only aggregate the cached results.")


# ---- pure logic (tested in tests/tools/test_bench_methods.py) ----

def budget_key(budget: Dict, row: Row) -> str:
    """Cache key: the budget in words plus a hash of the row's flags."""
    digest = hashlib.sha1(json.dumps([list(row.flags), row.rerank_top_k]).encode()).hexdigest()[:8]
    return (f"{budget['backbone']}_s{budget['image_size']}_p{budget['classes_per_batch']}"
            f"k{budget['images_per_class']}_e{budget['epochs']}_d{budget['embedding_dim']}_{digest}")


def result_path(runs_dir: str, row_name: str, seed: int, key: str) -> str:
    return os.path.join(runs_dir, row_name, f"seed{seed}", f"result-{key}.json")


def train_command(row: Row, budget: Dict, seed: int, train_dir: str, eval_dir: str,
                  output_dir: str) -> List[str]:
    """The `kdml.train` command line of one run (row flags last, so they win)."""
    return [sys.executable, "-m", "kdml.train", f"--dataset=folder:{train_dir}",
            f"--eval_dataset=folder:{eval_dir}", "--data_kind=glyph",
            f"--backbone={budget['backbone']}", f"--image_size={budget['image_size']}",
            f"--classes_per_batch={budget['classes_per_batch']}",
            f"--images_per_class={budget['images_per_class']}",
            f"--embedding_dim={budget['embedding_dim']}", f"--epochs={budget['epochs']}",
            f"--eval_every={budget['epochs']}", f"--seed={seed}", "--verbose=0",
            "--noverify_images", "--resume", f"--output_dir={output_dir}", *row.flags]


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (ddof=1; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))


COLUMNS = (("recall@1", "Recall@1 (%)", 100.0), ("map@r", "MAP@R (%)", 100.0),
           ("one_shot_20way", "20-way 1-shot (%)", 100.0),
           ("reranked_recall@1", "re-ranked R@1 (%)", 100.0), ("wall_s", "wall s / run", 1.0))


def format_table(results: Dict[str, List[Dict]]) -> str:
    """Markdown table: one line per row name, mean +- std over its seeds' results."""
    shown = [c for c in COLUMNS if any(c[0] in r for runs in results.values() for r in runs)]
    lines = ["| method | seeds | " + " | ".join(c[1] for c in shown) + " |",
             "|---|---:|" + "---:|" * len(shown)]
    for name, runs in results.items():
        if not runs:
            continue
        cells = []
        for key, _, scale in shown:
            values = [r[key] * scale for r in runs if key in r]
            if not values:
                cells.append("")
                continue
            mean, std = mean_std(values)
            digits = 0 if key == "wall_s" else 2
            cells.append(f"{mean:.{digits}f} ± {std:.{digits}f}")
        seeds = ",".join(str(r["seed"]) for r in runs)
        lines.append(f"| `{name}` | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def alphabet_of(class_name: str) -> str:
    """"Japanese_(katakana)/character01" -> "Japanese_(katakana)"."""
    return class_name.replace(os.sep, "/").split("/")[0]


# ---- data and runs ----

def unpack(omniglot_dir: str, cache_dir: str) -> Tuple[str, str]:
    """Unzips both subsets into `cache_dir` (once) and links the evaluation alphabets
    into `<cache_dir>/eval_unseen_alphabets/`; returns (train_dir, eval_dir)."""
    for name in (TRAIN_ZIP, EVAL_ZIP):
        target = os.path.join(cache_dir, name)
        if not os.path.isdir(target):
            archive = os.path.join(omniglot_dir, f"{name}.zip")
            if not os.path.exists(archive):
                raise FileNotFoundError(f"{archive} not found; pass --omniglot_dir=<folder with "
                                        f"{TRAIN_ZIP}.zip and {EVAL_ZIP}.zip>.")
            tmp = f"{target}.tmp-{os.getpid()}"
            with zipfile.ZipFile(archive) as z:
                z.extractall(tmp)
            os.replace(os.path.join(tmp, name), target)
            os.rmdir(tmp)
    eval_dir = os.path.join(cache_dir, "eval_unseen_alphabets")
    os.makedirs(eval_dir, exist_ok=True)
    for alphabet in EVAL_ALPHABETS:
        link = os.path.join(eval_dir, alphabet)
        if not os.path.exists(link):
            os.symlink(os.path.join(cache_dir, EVAL_ZIP, alphabet), link)
    return os.path.join(cache_dir, TRAIN_ZIP), eval_dir


def evaluate_run(output_dir: str, train_dir: str, eval_dir: str, budget: Dict, row: Row) -> Dict:
    """Recall@1 and MAP@R of the run, its one-shot accuracy, optional re-ranked R@1."""
    import keras
    import numpy as np

    import kdml  # noqa: F401  (registers the layers for load_model)
    from kdml.data import eval_dataset, load_dataset
    from kdml.evaluation import few_shot_accuracy
    from kdml.training import embed

    with open(os.path.join(output_dir, "metrics.json")) as f:
        final = json.load(f)["final"]
    splits = load_dataset(f"folder:{train_dir}", eval_spec=f"folder:{eval_dir}",
                          verify_images=False)
    test = splits.test
    embedder = keras.saving.load_model(os.path.join(output_dir, "embedder.keras"))
    embeddings = embed(embedder, eval_dataset(test, image_size=budget["image_size"]))
    alphabets = np.array([alphabet_of(test.class_names[label]) for label in test.labels])
    classes_per_alphabet = {a: len({l for l, b in zip(test.labels, alphabets) if b == a})
                            for a in set(alphabets)}
    keep = np.array([classes_per_alphabet[a] >= N_WAY for a in alphabets])
    shot = few_shot_accuracy(embeddings[keep], test.labels[keep], n_way=N_WAY, k_shot=1,
                             num_episodes=EPISODES, groups=alphabets[keep], seed=0)
    result = {"recall@1": final["recall@1"], "map@r": final["map@r"],
              "one_shot_20way": shot["accuracy"], "one_shot_ci95": shot["ci95"],
              "test_images": int(len(test.labels)), "test_classes": int(test.num_classes),
              "one_shot_alphabets": sorted(a for a, n in classes_per_alphabet.items() if n >= N_WAY)}
    if row.rerank_top_k:
        from kdml.evaluation.rerank import rerank_metrics

        scorer_model = keras.saving.load_model(os.path.join(output_dir, "pddm.keras"))

        def scorer(a, b):
            return np.reshape(scorer_model.predict([a, b], batch_size=8192, verbose=0), (-1,))

        reranked = rerank_metrics(embeddings, test.labels, scorer, top_k=row.rerank_top_k, ks=(1,))
        result["reranked_recall@1"] = reranked["reranked_recall@1"]
    return result


def _write_json(path: str, payload) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
    os.replace(tmp, path)


def find_same_run(runs_dir: str, seed: int, key: str):
    """A cached result of any row with this seed and key (same flags, same budget)."""
    if not os.path.isdir(runs_dir):
        return None
    for other in sorted(os.listdir(runs_dir)):
        path = result_path(runs_dir, other, seed, key)
        if os.path.exists(path):
            return path
    return None


def run_one(name: str, row: Row, seed: int, budget: Dict, train_dir: str, eval_dir: str,
            runs_dir: str) -> Dict:
    key = budget_key(budget, row)
    path = result_path(runs_dir, name, seed, key)
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    same = find_same_run(runs_dir, seed, key)  # another row with the same flags and budget
    if same is not None:
        with open(same) as f:
            result = {**json.load(f), "row": name, "same_run_as": same}
        _write_json(path, result)
        return result
    output_dir = os.path.join(os.path.dirname(path), f"run-{key}")
    command = train_command(row, budget, seed, train_dir, eval_dir, output_dir)
    print(f"[{name} seed {seed}] {' '.join(command[1:])}", flush=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=ROOT)
    wall = time.perf_counter() - start
    result = {"row": name, "seed": seed, "key": key, "flags": list(row.flags),
              "budget": budget, "wall_s": wall,
              **evaluate_run(output_dir, train_dir, eval_dir, budget, row)}
    with open(os.path.join(output_dir, "metrics.json")) as f:
        epochs = json.load(f)["epochs"]
    last = epochs.get(str(budget["epochs"]), {})
    result.update({k: v for k, v in last.items() if k.startswith("proxy_") or k == "loss"})
    _write_json(path, result)
    print(f"[{name} seed {seed}] {wall:.0f} s: " + ", ".join(
        f"{k}={result[k]:.4f}" for k in ("recall@1", "map@r", "one_shot_20way")), flush=True)
    return result


def cached_results(runs_dir: str, names: Sequence[str], budget: Dict) -> Dict[str, List[Dict]]:
    results = {}
    for name in names:
        key = budget_key(budget, ROWS[name])
        runs = []
        row_dir = os.path.join(runs_dir, name)
        seeds = sorted(int(d[4:]) for d in os.listdir(row_dir)
                       if d.startswith("seed")) if os.path.isdir(row_dir) else []
        for seed in seeds:
            path = result_path(runs_dir, name, seed, key)
            if os.path.exists(path):
                with open(path) as f:
                    runs.append(json.load(f))
        results[name] = runs
    return results


def main(argv):
    del argv
    unknown = [r for r in FLAGS.rows if r not in ROWS]
    if unknown:
        raise app.UsageError(f"Unknown rows {unknown}. Valid rows: {', '.join(ROWS)}")
    budget = {**BUDGET, "epochs": FLAGS.epochs}
    if not FLAGS.table_only:
        train_dir, eval_dir = unpack(FLAGS.omniglot_dir, FLAGS.cache_dir)
        for name in FLAGS.rows:
            for seed in FLAGS.seeds:
                run_one(name, ROWS[name], int(seed), budget, train_dir, eval_dir, FLAGS.runs_dir)
    print(f"\nOmniglot: train {TRAIN_ZIP} (136 characters), test {', '.join(EVAL_ALPHABETS)} "
          f"(106 characters); {budget['backbone']} {budget['image_size']} px, "
          f"P x K = {budget['classes_per_batch']} x {budget['images_per_class']}, "
          f"{budget['epochs']} epochs, d = {budget['embedding_dim']}; mean ± std over seeds.\n")
    print(format_table(cached_results(FLAGS.runs_dir, FLAGS.rows, budget)))


if __name__ == "__main__":
    _define_flags()
    app.run(main)
