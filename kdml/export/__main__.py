"""`python -m kdml.export`: SavedModel + TFLite files of a trained embedder and their parity report.

Example:
    python -m kdml.export --model=runs/default/embedder.keras --output_dir=runs/default/export \
        --formats=saved_model,tflite --quantization=float32,float16,dynamic,int8

The dataset (calibration images from its training classes, parity on its held-out
classes) is read from the run's `metrics.json` next to the model, or given by
`--dataset`. Writes the files, a sidecar `<file>.json` with the metadata beside each,
and `parity.json`; prints the parity table. `--gallery=<kdml.index dir>` adds the
search model (`kdml.export.search`). Exit code 1 when int8 Recall@1 drops more
than `--max_recall_drop` points, 2 on bad arguments.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags, logging  # noqa: E402

from kdml import command_line  # noqa: E402
from kdml.export.parity import ParityError  # noqa: E402
from kdml.export.workflow import run_export  # noqa: E402
from kdml.quiet_startup import quiet_logs  # noqa: E402

FLAGS = flags.FLAGS
PROG = "python -m kdml.export"
# Shared with the other commands (kdml.command_line): --model, --output_dir, --dataset, --seed.
command_line.define_flag("model", note="A .keras file.", required=True)
command_line.define_flag("output_dir", note="Default: <model dir>/export.")
flags.DEFINE_list("formats", ["saved_model", "tflite"], "saved_model, tflite.")
flags.DEFINE_list("quantization", ["float32", "float16", "dynamic", "int8"],
                  "TFLite variants: float32, float16, dynamic, int8.")
command_line.define_flag("dataset", note="Default: the dataset of the run's metrics.json next "
                         "to --model, else synthetic.")
flags.DEFINE_string("eval_dataset", None, "folder:<dir> held-out classes (as in training).")
flags.DEFINE_string("data_dir", None, "tensorflow-datasets data directory.")
flags.DEFINE_integer("calibration_images", 300, "Training images that calibrate int8.")
flags.DEFINE_integer("parity_images", 2000,
                     "At most this many held-out images (whole classes) in the parity report; 0: all.")
flags.DEFINE_integer("latency_runs", 50, "Images timed per .tflite file (0: skip latency).")
flags.DEFINE_float("max_recall_drop", 1.0,
                   "Fail when int8 Recall@1 is more than this many points below Keras'.")
flags.DEFINE_boolean("parity", True, "Compute the parity report.")
command_line.define_flag("seed", 0, "It draws the calibration and parity images (and the "
                         "synthetic dataset).")
flags.DEFINE_string("gallery", None, "A kdml.index directory built by --model: also write the "
                    "search model (SavedModel signature 'search', embedder_<q>_search.tflite: "
                    "images -> top-k gallery rows and cosines).")
flags.DEFINE_enum("search_gallery", "float16", ["float16", "int8"],
                  "How the search model stores the gallery: float16, or int8 with a per-row "
                  "scale.")
flags.DEFINE_integer("search_k", 5, "Gallery items the search model returns per image.")
flags.DEFINE_string("search_calibration", None, "Labelled source (folder:<dir>, synthetic, "
                    "tfds:<name>) on which each search model re-checks the index's threshold "
                    "(default: the data the index was calibrated on).")


def main(argv):
    del argv
    quiet_logs()
    try:
        run_export(FLAGS.model, FLAGS.output_dir, tuple(FLAGS.formats), tuple(FLAGS.quantization),
                   FLAGS.dataset, FLAGS.eval_dataset, FLAGS.data_dir, FLAGS.calibration_images,
                   FLAGS.parity_images, FLAGS.latency_runs, FLAGS.max_recall_drop, FLAGS.parity,
                   FLAGS.seed, gallery=FLAGS.gallery, gallery_dtype=FLAGS.search_gallery,
                   search_k=FLAGS.search_k, search_calibration=FLAGS.search_calibration)
    except ParityError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(1)
    except (ValueError, FileNotFoundError) as error:
        logging.debug("Traceback of the error below:", exc_info=True)
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main, flags_parser=command_line.absl_flags_parser(PROG))
