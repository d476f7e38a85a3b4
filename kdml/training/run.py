"""`train(config)`: data -> embedder + objective under a strategy -> `model.fit` -> files.

Writes to `config.output_dir`:
- `checkpoints/ckpt-<step>/` (atomic; `resume=True` continues the newest),
- `logs/` (TensorBoard),
- `metrics.json`: `initial` (the untrained embedder), `epochs` {epoch: loss,
  test retrieval metrics, images/s}, `final`, and the resolved `config`,
- `embedder.keras`: the trained embedder, loadable with `keras.saving.load_model`
  after `import kdml`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Dict

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from kdml.config import TrainConfig
from kdml.data.augmentation import AUGMENTATIONS
from kdml.data.pipeline import eval_dataset, steps_per_epoch, train_dataset
from kdml.data.sampler import check_batch_geometry
from kdml.data.sources import load_dataset
from kdml.distribute import create_strategy
from kdml.evaluation import format_metrics_table, retrieval_metrics
from kdml.methods import BACKBONE_GROUP, get_method
from kdml.models import build_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training.callbacks import BackboneWarmup, RetrievalEvaluation, Throughput
from kdml.training.checkpointing import (Checkpointer, latest_checkpoint, restore_checkpoint,
                                         write_json_atomic)


def embed(embedder: keras.Model, dataset) -> np.ndarray:
    """Embeddings `(N, d)` of an ordered `eval_dataset` of (images, labels), in its order.

    Uses the compiled, strategy-aware `predict`; the labels are the image set's own.
    """
    return embedder.predict(dataset.map(lambda images, labels: images), verbose=0)


def save_model_atomic(model: keras.Model, path: str) -> None:
    tmp = f"{path[:-len('.keras')]}.tmp-{os.getpid()}.keras"
    model.save(tmp)
    os.replace(tmp, path)


def _jit(value: str):
    """"auto" is Keras' rule: XLA off on CPU-only machines (measured 2x slower for conv4
    here, tools/bench_speed.py) and under a distribution strategy, on otherwise."""
    return {"auto": "auto", "true": True, "false": False}[value]


@contextlib.contextmanager
def _dtype_policy(mixed_precision: bool):
    """The mixed policy (float16 on GPU, bfloat16 elsewhere) while the model is built.

    Layers keep the policy they were built with, so the global one is restored after.
    """
    previous = keras.mixed_precision.global_policy()
    if mixed_precision:
        gpu = bool(tf.config.list_physical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if gpu else "mixed_bfloat16")
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def train(config: TrainConfig) -> Dict:
    """Runs one training job; returns the contents of `metrics.json`."""
    method = get_method(config.method)
    splits = load_dataset(config.dataset, eval_spec=config.eval_dataset, data_dir=config.data_dir,
                          download=config.download, seed=config.seed,
                          verify_images=config.verify_images)
    config = config.resolved(config.data_kind or splits.kind)
    check_batch_geometry(splits.train.labels, config.classes_per_batch, config.images_per_class,
                         name=f"training set of {config.dataset}")
    out = config.output_dir
    checkpoint_dir = os.path.join(out, "checkpoints")
    metrics_path = os.path.join(out, "metrics.json")
    resume_from = latest_checkpoint(checkpoint_dir)
    if resume_from and not config.resume:
        raise ValueError(
            f"{out} holds checkpoints of an earlier run ({resume_from}). Pass --resume to "
            "continue it, or choose another --output_dir.")
    os.makedirs(out, exist_ok=True)
    keras.utils.set_random_seed(config.seed)

    logging.info("Data: %s, %d train images / %d classes, %d test images / %d classes.",
                 config.dataset, splits.train.num_images, splits.train.num_classes,
                 splits.test.num_images, splits.test.num_classes)
    strategy = create_strategy(config.strategy)
    with strategy.scope(), _dtype_policy(config.mixed_precision):
        embedder = build_embedder(config.backbone, "pooling", config.embedding_dim,
                                  config.image_size, config.weights,
                                  freeze_batchnorm=config.freeze_batchnorm)
        objective = method.build(embedder, splits.train.num_classes, config)
        optimizer = GroupedAdamW(objective.learning_rate_multipliers, learning_rate=config.lr,
                                 weight_decay=config.weight_decay)
        model = objective.model
        model.compile(optimizer=optimizer, loss=objective.loss, jit_compile=_jit(config.jit_compile))
        optimizer.build(model.trainable_variables)

    history = {"config": dataclasses.asdict(config), "epochs": {}}
    start_step = 0
    if resume_from:
        start_step = restore_checkpoint(model, resume_from)["step"]
        if os.path.exists(metrics_path):
            with open(metrics_path) as f:
                previous = json.load(f)
            history["epochs"] = previous.get("epochs", {})
            history["initial"] = previous.get("initial")

    test_data = eval_dataset(splits.test, image_size=config.image_size,
                             batch_size=config.eval_batch_size,
                             crop_fraction=config.eval_crop_fraction)

    def evaluate():
        embeddings = embed(embedder, test_data)
        metrics = retrieval_metrics(embeddings, splits.test.labels, ks=config.recall_ks,
                                    seed=config.seed)
        if objective.extra_metrics is not None:
            metrics.update(objective.extra_metrics(embeddings, splits.test.labels))
        return metrics

    if not history.get("initial"):
        history["initial"] = evaluate()
        logging.info("Untrained embedder: %s", history["initial"])
    write_json_atomic(metrics_path, history)

    def record(epoch, logs):
        history["epochs"][str(epoch + 1)] = {
            k: float(v) for k, v in logs.items() if not k.startswith("test_")}
        write_json_atomic(metrics_path, history)

    per_epoch = steps_per_epoch(splits.train.num_images, config.batch_size)
    callbacks = [
        BackboneWarmup(config.warmup_epochs, BACKBONE_GROUP),
        Throughput(config.batch_size),
        RetrievalEvaluation(evaluate, config.eval_every, config.epochs, on_result=record),
        Checkpointer(checkpoint_dir, config.checkpoint_every_steps, config.keep_checkpoints),
        *objective.callbacks,
        keras.callbacks.TensorBoard(os.path.join(out, "logs")),
    ]
    augmentation = AUGMENTATIONS[config.augmentation]

    def fit(first_step, initial_epoch, epochs, steps):
        data = train_dataset(splits.train, image_size=config.image_size,
                             classes_per_batch=config.classes_per_batch,
                             images_per_class=config.images_per_class,
                             augmentation=augmentation, seed=config.seed, start_step=first_step)
        model.fit(data, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps, shuffle=False,
                  callbacks=callbacks, verbose=config.verbose)

    epoch, offset = divmod(start_step, per_epoch)
    if offset:  # finish the interrupted epoch, then go on with whole epochs
        fit(start_step, epoch, epoch + 1, per_epoch - offset)
        epoch += 1
    if epoch < config.epochs:
        fit(epoch * per_epoch, epoch, config.epochs, per_epoch)

    save_model_atomic(embedder, os.path.join(out, "embedder.keras"))
    last = history["epochs"].get(str(config.epochs))
    history["final"] = {k: last[k] for k in history["initial"]} if last else evaluate()
    write_json_atomic(metrics_path, history)
    print(format_metrics_table({"initial": history["initial"], "final": history["final"]}))
    return history
