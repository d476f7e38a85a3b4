"""Parity table of the exported embedders after a short glyph training (README, Export).

For each backbone (default conv4 and mobilenet_v3_small): `python -m kdml.train` on the
synthetic glyphs for a few epochs (Proxy Anchor), then `python -m kdml.export`
(SavedModel + float32 / float16 / dynamic / int8 TFLite) and its parity report on the
held-out classes; prints one markdown table per backbone.

    python tools/bench_export.py --epochs=5 --backbones=conv4,mobilenet_v3_small
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("backbones", ["conv4", "mobilenet_v3_small"], "Backbones to train and export.")
flags.DEFINE_integer("epochs", 5, "Training epochs on the synthetic glyphs.")
flags.DEFINE_integer("image_size", 32, "Image size (mobilenet_v3_small needs >= 32).")
flags.DEFINE_integer("embedding_dim", 128, "Embedding size.")
flags.DEFINE_string("output_dir", "runs/bench_export", "Where runs and exports go.")
flags.DEFINE_integer("calibration_images", 300, "int8 calibration images.")
flags.DEFINE_integer("latency_runs", 200, "Images timed per .tflite file.")


def main(argv):
    del argv
    from kdml.config import TrainConfig
    from kdml.export.workflow import run_export
    from kdml.export.parity import ParityError, format_parity_table
    from kdml.training import train

    tables = []
    for backbone in FLAGS.backbones:
        run_dir = os.path.join(FLAGS.output_dir, backbone)
        model = os.path.join(run_dir, "embedder.keras")
        if not os.path.isfile(model):
            train(TrainConfig(dataset="synthetic", backbone=backbone, image_size=FLAGS.image_size,
                              embedding_dim=FLAGS.embedding_dim, epochs=FLAGS.epochs,
                              eval_every=FLAGS.epochs, output_dir=run_dir, verbose=2))
        try:
            _, report = run_export(model, os.path.join(run_dir, "export"),
                                   calibration_count=FLAGS.calibration_images,
                                   latency_runs=FLAGS.latency_runs)
        except ParityError as error:
            print(f"{backbone}: {error}", file=sys.stderr)
            with open(os.path.join(run_dir, "export", "parity.json")) as f:
                report = json.load(f)
        tables.append(f"**{backbone}** ({FLAGS.image_size} px, d = {FLAGS.embedding_dim}, "
                      f"{FLAGS.epochs} epochs): " + format_parity_table(report))
    print("\n\n".join(tables))


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    app.run(main)
