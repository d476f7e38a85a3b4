"""Does a trained PDDM unit measure similarity? A diagnostic for `--method=pddm` runs.

For a run folder (`embedder.keras` + `pddm.keras`, as `kdml.train --method=pddm` and
the benchmark write them) and a folder dataset of classes the run has not trained on
(e.g. the benchmark's validation split), prints:

- the spread of the unit's scores over all pairs (a collapsed unit scores every pair
  alike: a standard deviation near 0);
- how well the unit's score and the embeddings' cosine each separate positive pairs
  (same class) from negative ones: ROC AUC (scikit-learn), 0.5 = chance;
- Recall@1 after the unit re-ranks each image's top-k cosine neighbours, k = 1 (no
  re-ranking), 2, 4, ..., 32 (`kdml.evaluation.rerank.select_top_k`).

    python tools/probe_pddm_unit.py --run_dir=runs/pddm --data=<root>/validation \\
        --image_size=28

All pairs of at most `--max_images` images (a seeded sample) are scored.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def probe(run_dir, data, image_size, crop_fraction=0.875, max_images=800, seed=0):
    """Returns a dict of the figures above (see the module docstring)."""
    import keras
    import numpy as np
    from sklearn.metrics import roc_auc_score

    import kdml  # noqa: F401  registers the PDDM layers for loading
    from kdml.benchmark.runs import embed_folder, rerank_evaluation

    images, embeddings = embed_folder(run_dir, data, image_size=image_size,
                                      crop_fraction=crop_fraction)
    embeddings, labels = np.asarray(embeddings, "float32"), np.asarray(images.labels)
    if len(labels) > max_images:
        keep = np.sort(np.random.default_rng(seed).choice(len(labels), max_images, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
    unit = keras.saving.load_model(os.path.join(run_dir, "pddm.keras"), compile=False)
    n = len(labels)
    rows, cols = np.triu_indices(n, k=1)
    scores = np.asarray(unit.predict([embeddings[rows], embeddings[cols]], batch_size=16384,
                                     verbose=0)).reshape(-1)
    unit_rows = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    cosine = np.sum(unit_rows[rows] * unit_rows[cols], axis=1)
    same = labels[rows] == labels[cols]
    rerank = rerank_evaluation(run_dir, data, image_size=image_size, crop_fraction=crop_fraction)
    return {
        "images": n, "pairs": int(len(rows)), "positive_pairs": int(same.sum()),
        "unit_score_mean": float(scores.mean()), "unit_score_std": float(scores.std()),
        "unit_auc": float(roc_auc_score(same, scores)),
        "cosine_auc": float(roc_auc_score(same, cosine)),
        "reranked_recall@1": rerank["rerank_recall@1"],
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run_dir", required=True, help="Folder with embedder.keras and pddm.keras.")
    parser.add_argument("--data", required=True, help="Folder dataset <root>/<class>/<image>.")
    parser.add_argument("--image_size", type=int, required=True, help="The run's image size.")
    parser.add_argument("--crop_fraction", type=float, default=0.875)
    parser.add_argument("--max_images", type=int, default=800)
    args = parser.parse_args(argv)
    for name in ("embedder.keras", "pddm.keras"):
        if not os.path.exists(os.path.join(args.run_dir, name)):
            parser.error(f"{os.path.join(args.run_dir, name)} not found: --run_dir must be "
                         "the output folder of a `--method=pddm` run.")
    print(f"Probing the PDDM unit of {args.run_dir} on {args.data}", flush=True)
    print(json.dumps(probe(args.run_dir, args.data, args.image_size, args.crop_fraction,
                           args.max_images), indent=1))


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    main()
