"""Data-parallel scaling of the training step (prints figures).

Training images/s of the default job (Proxy Anchor, `conv4` at 28 px, global batch
P x K = 32 x 4 on the embedded glyphs, `kdml.data.train_dataset` sharded as in
`python -m kdml.train`) for:

- 1 replica (the default strategy),
- 2 replicas in one process (`MirroredStrategy`; over 2 GPUs when present, else
  over the CPU split into 2 logical devices),
- 2 worker processes on 127.0.0.1 (`MultiWorkerMirroredStrategy`, TF_CONFIG from
  `kdml.distribute.local_cluster`),

each in fresh processes (device layout and collectives are fixed at TensorFlow
start-up), with the ratio to 1 replica. The global batch is the same in all three,
so a ratio of 2 would be perfect scaling; on one CPU the replicas share the same
cores, so the ratio there measures the overhead of distribution, not a speed-up.

    python tools/bench_scaling.py [--steps=30] [--warmup_steps=5]
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

flags.DEFINE_integer("steps", 30, "Timed steps per measurement (after the warm-up).")
flags.DEFINE_integer("warmup_steps", 5, "Untimed steps first (tracing, pipeline fill).")
flags.DEFINE_integer("classes_per_batch", 32, "P.")
flags.DEFINE_integer("images_per_class", 4, "K.")
flags.DEFINE_integer("timeout", 600, "Seconds before a measurement's processes are killed.")
flags.DEFINE_enum("measure", None, ["one", "mirrored", "multi_worker"],
                  "Internal: run one measurement in this process and print its JSON.")
FLAGS = flags.FLAGS


def _measure(kind: str) -> dict:
    """Images/s of `kind` in this process (this worker's view for multi_worker)."""
    import tensorflow as tf

    if kind == "mirrored" and not tf.config.list_physical_devices("GPU"):
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)

    import keras

    from kdml.config import TrainConfig
    from kdml.data import AUGMENTATIONS, load_dataset, train_dataset
    from kdml.distribute import (create_strategy, distribute_batches, fix_multi_worker_build,
                                 worker_role)
    from kdml.methods import get_method
    from kdml.models import build_embedder
    from kdml.optimizers import GroupedAdamW

    strategy = create_strategy({"one": "auto", "mirrored": "mirrored",
                                "multi_worker": "multi_worker"}[kind])
    role = worker_role(strategy)
    config = TrainConfig(classes_per_batch=FLAGS.classes_per_batch,
                         images_per_class=FLAGS.images_per_class).resolved("glyph")
    splits = load_dataset("synthetic")
    keras.utils.set_random_seed(0)
    with strategy.scope():
        embedder = build_embedder(config.backbone, "pooling", config.embedding_dim,
                                  config.image_size, config.weights)
        objective = get_method("proxy_anchor").build(embedder, splits.train.num_classes, config)
        model = objective.model
        model.compile(optimizer=GroupedAdamW(objective.learning_rate_multipliers,
                                             learning_rate=config.lr),
                      loss=objective.loss, jit_compile=False)
        fix_multi_worker_build(model)
    data = distribute_batches(strategy, lambda index, count: train_dataset(
        splits.train, image_size=config.image_size, classes_per_batch=config.classes_per_batch,
        images_per_class=config.images_per_class, augmentation=AUGMENTATIONS["glyph"],
        num_shards=count, shard_index=index), config.batch_size)

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            float(logs["loss"])  # wait for the step
            if batch == FLAGS.warmup_steps - 1:
                self.start = time.perf_counter()
            self.end = time.perf_counter()

    clock = Clock()
    model.fit(data, epochs=1, steps_per_epoch=FLAGS.warmup_steps + FLAGS.steps, verbose=0,
              callbacks=[clock])
    seconds = clock.end - clock.start
    return {"kind": kind, "replicas": strategy.num_replicas_in_sync, "worker": role.index,
            "images_per_second": FLAGS.steps * config.batch_size / seconds,
            "devices": "GPU" if tf.config.list_physical_devices("GPU") else "CPU"}


def _run(kind: str, workers: int = 1) -> dict:
    """Runs the measurement in `workers` fresh processes; returns the chief's result."""
    from kdml.distribute import local_cluster

    args = [sys.executable, os.path.abspath(__file__), f"--measure={kind}",
            f"--steps={FLAGS.steps}", f"--warmup_steps={FLAGS.warmup_steps}",
            f"--classes_per_batch={FLAGS.classes_per_batch}",
            f"--images_per_class={FLAGS.images_per_class}"]
    envs = ([{"TF_CONFIG": c} for c in local_cluster(workers)] if kind == "multi_worker"
            else [{}])
    processes = [subprocess.Popen(args, env={**os.environ, **env}, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for env in envs]
    deadline = time.monotonic() + FLAGS.timeout
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=max(1, deadline - time.monotonic())))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, (stdout, stderr) in zip(processes, outputs):
        if process.returncode:
            raise RuntimeError(f"{kind} measurement failed:\n{stderr[-3000:]}")
    return json.loads(outputs[0][0].strip().splitlines()[-1])


def main(argv):
    del argv
    if FLAGS.measure:
        print(json.dumps(_measure(FLAGS.measure)))
        return
    rows = [("1 replica", _run("one")), ("2 replicas, one process (MirroredStrategy)",
                                         _run("mirrored")),
            ("2 workers on 127.0.0.1 (MultiWorkerMirroredStrategy)", _run("multi_worker", 2))]
    base = rows[0][1]["images_per_second"]
    batch = FLAGS.classes_per_batch * FLAGS.images_per_class
    print(f"conv4, 28 px, Proxy Anchor, global batch {batch}, {rows[0][1]['devices']}, "
          f"{os.cpu_count()} logical CPUs, {FLAGS.steps} timed steps")
    print("| setup | replicas | images/s | ratio to 1 replica |")
    print("|---|---:|---:|---:|")
    for name, result in rows:
        print(f"| {name} | {result['replicas']} | {result['images_per_second']:,.0f} | "
              f"{result['images_per_second'] / base:.2f} |")


if __name__ == "__main__":
    import quiet  # tools/quiet.py: TensorFlow starts without its start-up lines

    quiet.quiet_startup()
    app.run(main)
