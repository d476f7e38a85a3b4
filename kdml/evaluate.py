"""`python -m kdml.evaluate`: retrieval metrics of a saved embedder on a dataset's test classes.

Example:
    python -m kdml.evaluate --model=runs/default/embedder.keras --dataset=synthetic
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string("model", None, "Path of an embedder saved as .keras.", required=True)
flags.DEFINE_string("dataset", "synthetic", "synthetic | folder:<dir> | tfds:<name>.")
flags.DEFINE_string("eval_dataset", None, "folder:<dir>: evaluate on this folder's classes.")
flags.DEFINE_enum("split", "test", ["test", "train"], "Which classes of the dataset to retrieve.")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_list("recall_ks", ["1", "2", "4", "8"], "K values of Recall@K.")
flags.DEFINE_float("crop_fraction", 0.875, "Centre-crop fraction of the shorter side.")
flags.DEFINE_integer("batch_size", 256, "Images per inference batch.")
flags.DEFINE_integer("seed", 0, "Seed of k-means (NMI) and of the synthetic dataset.")
flags.DEFINE_string("output", None, "JSON file for the metrics (default: next to the model).")


def evaluate_model(model_path: str, dataset: str, split: str = "test", eval_dataset=None,
                   data_dir=None, ks=(1, 2, 4, 8), crop_fraction=0.875, batch_size=256,
                   seed=0) -> dict:
    """Loads an embedder and returns its retrieval metrics on a dataset split."""
    import keras

    import kdml  # noqa: F401  registers kdml's serializable classes
    from kdml.data.pipeline import eval_dataset as make_eval_dataset
    from kdml.data.sources import load_dataset
    from kdml.evaluation import retrieval_metrics
    from kdml.training import embed

    if not os.path.isfile(model_path):
        raise FileNotFoundError(f"No model file at {model_path}. Pass --model=<path>/embedder.keras.")
    embedder = keras.saving.load_model(model_path)
    height, width = embedder.input_shape[1:3]
    splits = load_dataset(dataset, eval_spec=eval_dataset, data_dir=data_dir, seed=seed)
    images = getattr(splits, split)
    data = make_eval_dataset(images, image_size=height, batch_size=batch_size,
                             crop_fraction=crop_fraction)
    return retrieval_metrics(embed(embedder, data), images.labels, ks=ks, seed=seed)


def main(argv):
    import json

    from kdml.evaluation import format_metrics_table

    del argv
    try:
        metrics = evaluate_model(FLAGS.model, FLAGS.dataset, FLAGS.split, FLAGS.eval_dataset,
                                 FLAGS.data_dir, tuple(int(k) for k in FLAGS.recall_ks),
                                 FLAGS.crop_fraction, FLAGS.batch_size, FLAGS.seed)
    except (ValueError, FileNotFoundError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    output = FLAGS.output or os.path.join(os.path.dirname(os.path.abspath(FLAGS.model)),
                                          f"eval_{FLAGS.split}.json")
    with open(output, "w") as f:
        json.dump({"model": FLAGS.model, "dataset": FLAGS.dataset, "split": FLAGS.split,
                   "metrics": metrics}, f, indent=2)
    print(format_metrics_table({os.path.basename(FLAGS.model): metrics}))
    print(f"Wrote {output}")


if __name__ == "__main__":
    app.run(main)
