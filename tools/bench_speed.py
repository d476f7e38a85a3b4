"""Training and input-pipeline throughput of the default job (prints figures).

Measures, for `conv4` at 28 px, P x K = 32 x 4, Proxy Anchor on the embedded
glyphs: the input pipeline alone (images/s), the compiled training step with and
without XLA (`jit_compile`), and their ratio. The input pipeline must never be the
bottleneck: pipeline / training >= 3.

    python tools/bench_speed.py [--steps=60] [--backbone=conv4] [--image_size=28]
"""

from __future__ import annotations

import os
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("steps", 60, "Timed steps per measurement (after warm-up).")
flags.DEFINE_string("backbone", "conv4", "Backbone.")
flags.DEFINE_integer("image_size", 28, "Image size.")
flags.DEFINE_integer("classes_per_batch", 32, "P.")
flags.DEFINE_integer("images_per_class", 4, "K.")
FLAGS = flags.FLAGS


def _rate(iterator, steps, batch, warmup=5):
    for _ in range(warmup):
        next(iterator)
    start = time.perf_counter()
    for _ in range(steps):
        next(iterator)
    return steps * batch / (time.perf_counter() - start)


def main(argv):
    del argv
    import keras

    from kdml.config import TrainConfig
    from kdml.data import AUGMENTATIONS, load_dataset, train_dataset
    from kdml.methods import get_method
    from kdml.models import build_embedder
    from kdml.optimizers import GroupedAdamW

    p, k, steps = FLAGS.classes_per_batch, FLAGS.images_per_class, FLAGS.steps
    batch = p * k
    splits = load_dataset("synthetic")
    data = train_dataset(splits.train, image_size=FLAGS.image_size, classes_per_batch=p,
                         images_per_class=k, augmentation=AUGMENTATIONS["glyph"])
    pipeline = _rate(iter(data), steps * 3, batch)

    rows = []
    for jit in (False, True):
        keras.utils.set_random_seed(0)
        config = TrainConfig(classes_per_batch=p, images_per_class=k).resolved("glyph")
        embedder = build_embedder(FLAGS.backbone, embedding_dim=512, image_size=FLAGS.image_size)
        objective = get_method("proxy_anchor").build(embedder, splits.train.num_classes, config)
        model = objective.model
        model.compile(GroupedAdamW(objective.learning_rate_multipliers, learning_rate=1e-3),
                      objective.loss, jit_compile=jit)
        cached = data.take(1).cache().repeat()  # a fixed batch: the step alone
        model.fit(cached, steps_per_epoch=5, epochs=1, verbose=0)
        start = time.perf_counter()
        model.fit(cached, steps_per_epoch=steps, epochs=1, verbose=0)
        step_only = steps * batch / (time.perf_counter() - start)
        start = time.perf_counter()
        model.fit(data, steps_per_epoch=steps, epochs=1, verbose=0)
        end_to_end = steps * batch / (time.perf_counter() - start)
        rows.append((jit, step_only, end_to_end))

    print(f"\n{FLAGS.backbone} at {FLAGS.image_size} px, P x K = {p} x {k}, proxy_anchor, "
          f"{os.cpu_count()} CPU cores\n")
    print("| measurement | images/s |")
    print("|---|---|")
    print(f"| input pipeline alone | {pipeline:,.0f} |")
    for jit, step_only, end_to_end in rows:
        print(f"| train step, jit_compile={jit} (fixed batch) | {step_only:,.0f} |")
        print(f"| fit with the pipeline, jit_compile={jit} | {end_to_end:,.0f} |")
    best = max(r[1] for r in rows)
    print(f"| **pipeline / fastest train step** | **{pipeline / best:.1f}x** |")


if __name__ == "__main__":
    app.run(main)
