"""`train(config)`: data -> embedder + objective under a strategy -> `model.fit` -> files.

Writes to `config.output_dir` (only the chief of a multi-worker run does; the other
workers write the same files to a temporary directory they delete, Keras' pattern,
since saving may read variables through collectives that every worker must join):
- `checkpoints/ckpt-<step>/` (atomic; `resume=True` continues the newest),
- `logs/` (TensorBoard),
- `metrics.json`: `initial` (the untrained embedder), `epochs` {epoch: loss,
  test retrieval metrics, images/s}, `final`, and the resolved `config`,
- `embedder.keras`: the trained embedder, loadable with `keras.saving.load_model`
  after `import kdml`,
- `features/` with `--freeze_backbone`: the backbone's cached features
  (`kdml.training.frozen`); the checkpoints then hold the head's side only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import tempfile
from typing import Dict

import keras
import numpy as np
import tensorflow as tf

from kdml.config import TrainConfig
from kdml.training.determinism import make_deterministic
from kdml.data.augmentation import AUGMENTATIONS
from kdml.data.pipeline import (eval_dataset, feature_eval_dataset, feature_train_dataset,
                                steps_per_epoch, train_dataset)
from kdml.data.sampler import check_batch_geometry, class_balanced_batches
from kdml.data.sources import load_dataset
from kdml.distribute import (check_replica_batch, create_strategy, describe_strategy,
                             distribute_batches, fix_multi_worker_build, worker_role)
from kdml.evaluation import format_metrics_table, retrieval_metrics
from kdml.methods import BACKBONE_GROUP, check_method_options, get_method
from kdml.models import backbone_spec, build_embedder, split_embedder
from kdml.optimizers import GroupedAdamW
from kdml.training.callbacks import (BackboneWarmup, EpochLoss, NonFiniteLossGuard,
                                     RetrievalEvaluation, Throughput)
from kdml.training.checkpointing import (Checkpointer, latest_checkpoint,
                                         remove_partial_checkpoints, restore_checkpoint,
                                         write_json_atomic)
from kdml.training.frozen import (FEATURES_DIR, check_fingerprint, check_frozen_options,
                                  frozen_config, prepare_features)


def embed(embedder: keras.Model, dataset) -> np.ndarray:
    """Embeddings `(N, d)` of an ordered `eval_dataset` of (images, labels), in its order.

    Uses the compiled, strategy-aware `predict`; the labels are the image set's own.
    Under MultiWorkerMirroredStrategy `predict` would shard the data over workers
    (and need every worker), so the chief embeds alone with its local copy of the
    weights instead, which are identical on every worker.
    """
    images = dataset.map(lambda images, labels: images)
    strategy = getattr(embedder, "distribute_strategy", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return embedder.predict(images, verbose=0)
    forward = tf.function(lambda x: embedder(x, training=False))
    return np.concatenate([forward(batch).numpy() for batch in images], axis=0)


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


# The settings that make a run what it is: a resume with other values would train
# another model on the checkpoint of this one (the variables may even have the same
# shapes, e.g. proxy_anchor -> so_proxy), so it is refused. Epochs, evaluation and
# checkpoint frequency may change on resume.
RUN_IDENTITY = ("method", "dataset", "eval_dataset", "backbone", "weights", "embedding_dim",
                "image_size", "classes_per_batch", "images_per_class", "seed", "views",
                "xbm_size", "freeze_backbone", "pooling")


def check_same_run(config: TrainConfig, metrics_path: str) -> None:
    """Raises a ValueError when `config` differs from the run recorded in `metrics_path`."""
    if not os.path.exists(metrics_path):
        return
    with open(metrics_path) as f:
        recorded = json.load(f).get("config", {})
    current = dataclasses.asdict(config)
    changed = [f"--{k}={recorded[k]!r} (now {current[k]!r})" for k in RUN_IDENTITY
               if k in recorded and _comparable(recorded[k]) != _comparable(current[k])]
    if changed:
        raise ValueError(
            f"--resume: {os.path.dirname(metrics_path) or '.'} holds a run with other settings: "
            f"{', '.join(changed)}. Resume with that run's flags, or choose another --output_dir.")


def _comparable(value):
    return list(value) if isinstance(value, (list, tuple)) else value


def train(config: TrainConfig) -> Dict:
    """Runs one training job; returns the contents of `metrics.json`."""
    method = get_method(config.method)
    if config.deterministic:  # before any TensorFlow op (kdml.training.determinism)
        make_deterministic()
    check_method_options(config)
    check_frozen_options(config)  # before `resolved` fills --augmentation from the data kind
    # First: MultiWorkerMirroredStrategy configures collectives at program start-up,
    # before any other TensorFlow op (the folder source decodes images).
    strategy = create_strategy(config.strategy)
    role = worker_role(strategy)
    splits = load_dataset(config.dataset, eval_spec=config.eval_dataset, data_dir=config.data_dir,
                          download=config.download, seed=config.seed,
                          verify_images=config.verify_images)
    config = frozen_config(config.resolved(config.data_kind or splits.kind))
    check_batch_geometry(splits.train.labels, config.classes_per_batch, config.images_per_class,
                         name=f"training set of {config.dataset}")
    check_replica_batch(config.batch_size, strategy)
    out = config.output_dir
    resume_from = latest_checkpoint(os.path.join(out, "checkpoints"))
    if resume_from and not config.resume:
        raise ValueError(
            f"{out} holds checkpoints of an earlier run ({resume_from}). Pass --resume to "
            "continue it, or choose another --output_dir.")
    if resume_from:
        check_same_run(config, os.path.join(out, "metrics.json"))
    # Every worker reads the chief's checkpoints (so --output_dir must be storage they
    # all see); only the chief writes there.
    write_dir = out if role.is_chief else tempfile.mkdtemp(prefix=f"kdml-worker{role.index}-")
    try:
        return _train(config, method, splits, strategy, role, out, write_dir, resume_from)
    finally:
        if not role.is_chief:
            shutil.rmtree(write_dir, ignore_errors=True)


def _train(config, method, splits, strategy, role, out, write_dir, resume_from) -> Dict:
    checkpoint_dir = os.path.join(write_dir, "checkpoints")
    metrics_path = os.path.join(out, "metrics.json")
    os.makedirs(write_dir, exist_ok=True)
    if role.is_chief:
        remove_partial_checkpoints(checkpoint_dir)
    keras.utils.set_random_seed(config.seed)

    per_epoch = config.steps_per_epoch or steps_per_epoch(splits.train.num_images, config.batch_size)
    if role.is_chief:
        print(describe_run(config, method, splits, strategy, role, per_epoch, resume_from),
              flush=True)
    with strategy.scope(), _dtype_policy(config.mixed_precision):
        head, head_options = method.head(config)  # the method table names its head
        embedder = build_embedder(config.backbone, head, config.embedding_dim,
                                  config.image_size, config.weights,
                                  freeze_batchnorm=config.freeze_batchnorm,
                                  head_options=head_options)
        # --freeze_backbone: the method trains the head model on cached features; the
        # embedder (backbone + that head) is what is saved.
        trained = embedder
        if config.freeze_backbone:
            extractor, trained = split_embedder(embedder)
        objective = method.build(trained, splits.train.num_classes, config)
        optimizer = GroupedAdamW(objective.learning_rate_multipliers, learning_rate=config.lr,
                                 weight_decay=config.weight_decay)
        model = objective.model
        model.compile(optimizer=optimizer, loss=objective.loss, jit_compile=_jit(config.jit_compile))
        # model.optimizer: under mixed_float16 a LossScaleOptimizer wrapping `optimizer`.
        model.optimizer.build(model.trainable_variables)
        fix_multi_worker_build(model)

    frozen = None
    if config.freeze_backbone:
        frozen = prepare_features(extractor, splits.train, splits.test, config,
                                  os.path.join(write_dir, FEATURES_DIR))
        if role.is_chief:
            print(frozen.describe(), flush=True)

    history = {"config": dataclasses.asdict(config), "epochs": {}}
    if frozen is not None:
        history["features"] = frozen.summary()
    start_step, epoch_loss = 0, EpochLoss()
    if resume_from:
        state = restore_checkpoint(model, resume_from)
        if frozen is not None:
            check_fingerprint(state, frozen.fingerprint, resume_from)
        start_step = state["step"]
        epoch_loss.base_sum = state.get("epoch_loss_sum", 0.0)
        epoch_loss.base_steps = state.get("epoch_steps", 0)
        if role.is_chief and os.path.exists(metrics_path):
            with open(metrics_path) as f:
                previous = json.load(f)
            history["epochs"] = previous.get("epochs", {})
            history["initial"] = previous.get("initial")

    if frozen is not None:
        test_data = feature_eval_dataset(frozen.test.features, splits.test.labels,
                                         batch_size=config.eval_batch_size)
    else:
        test_data = eval_dataset(splits.test, image_size=config.image_size,
                                 batch_size=config.eval_batch_size,
                                 crop_fraction=config.eval_crop_fraction)

    def evaluate():
        embeddings = embed(trained, test_data)
        metrics = retrieval_metrics(embeddings, splits.test.labels, ks=config.recall_ks,
                                    seed=config.seed)
        if objective.extra_metrics is not None:
            metrics.update(objective.extra_metrics(embeddings, splits.test.labels))
        return metrics

    # Retrieval is evaluated and recorded by the chief alone (with no collectives,
    # so the other workers simply wait for it at the next step).
    if role.is_chief and not history.get("initial"):
        history["initial"] = evaluate()
        print("untrained (%):", ", ".join(f"{k} {100 * v:.2f}" for k, v in history["initial"].items()),
              flush=True)
    if role.is_chief:
        write_json_atomic(metrics_path, history)

    def record(epoch, logs):
        history["epochs"][str(epoch + 1)] = {
            k: float(v) for k, v in logs.items() if not k.startswith("test_")}
        write_json_atomic(metrics_path, history)

    def describe_batch(step):
        """The classes of global batch `step` (a pure function of seed and step)."""
        indices = next(iter(class_balanced_batches(
            splits.train.labels, config.classes_per_batch, config.images_per_class,
            seed=config.seed, start_step=step).take(1))).numpy()
        classes = sorted(set(splits.train.labels[indices].tolist()))
        names = ", ".join(f"{c} ({splits.train.class_names[c]!r})" for c in classes)
        return f"{len(indices)} images of classes {names}"

    # The method's callbacks with state outside the model's weights (a loss's variables).
    stateful = [c for c in objective.callbacks if hasattr(c, "checkpoint_state")]
    if resume_from:
        for callback in stateful:
            callback.restore_checkpoint_state(state)

    def checkpoint_state():
        extra = epoch_loss.state()
        if frozen is not None:
            extra["backbone_fingerprint"] = frozen.fingerprint
        for callback in stateful:
            extra.update(callback.checkpoint_state())
        return extra

    checkpointer = Checkpointer(checkpoint_dir, config.checkpoint_every_steps,
                                config.keep_checkpoints, extra_state=checkpoint_state)
    guard = NonFiniteLossGuard(describe_batch,
                               lambda: latest_checkpoint(os.path.join(out, "checkpoints")))
    callbacks = [
        guard,  # first: a NaN step raises before anything below can checkpoint it
        epoch_loss,  # the whole epoch's loss, also for an epoch resumed mid-way
        *([] if frozen else [BackboneWarmup(config.warmup_epochs, BACKBONE_GROUP,
                                            embedder.get_layer("backbone"))]),
        Throughput(config.batch_size),
        *objective.callbacks,  # before the evaluation: what they log reaches metrics.json
        *([RetrievalEvaluation(evaluate, config.eval_every, config.epochs, on_result=record)]
          if role.is_chief else []),
        checkpointer,
        keras.callbacks.TensorBoard(os.path.join(write_dir, "logs")),
    ]
    augmentation = AUGMENTATIONS[config.augmentation]

    def fit(first_step, initial_epoch, epochs, steps):
        def worker_batches(shard_index, num_shards):
            if frozen is not None:
                return feature_train_dataset(
                    frozen.train.features, splits.train.labels,
                    classes_per_batch=config.classes_per_batch,
                    images_per_class=config.images_per_class, seed=config.seed,
                    start_step=first_step, num_shards=num_shards, shard_index=shard_index,
                    views=config.views, instance_labels=method.instance_labels(config))
            return train_dataset(splits.train, image_size=config.image_size,
                                 classes_per_batch=config.classes_per_batch,
                                 images_per_class=config.images_per_class,
                                 augmentation=augmentation, seed=config.seed,
                                 start_step=first_step, num_shards=num_shards,
                                 shard_index=shard_index, views=config.views,
                                 instance_labels=method.instance_labels(config))

        data = distribute_batches(strategy, worker_batches, config.batch_size * config.views)
        checkpointer.step = guard.step = first_step
        model.fit(data, initial_epoch=initial_epoch, epochs=epochs, steps_per_epoch=steps, shuffle=False,
                  callbacks=callbacks, verbose=config.verbose)

    epoch, offset = divmod(start_step, per_epoch)
    if offset != epoch_loss.base_steps:  # a checkpoint written before this state existed
        epoch_loss.base_sum, epoch_loss.base_steps = 0.0, 0
    if offset:  # finish the interrupted epoch, then go on with whole epochs
        fit(start_step, epoch, epoch + 1, per_epoch - offset)
        epoch += 1
    if epoch < config.epochs:
        fit(epoch * per_epoch, epoch, config.epochs, per_epoch)

    save_model_atomic(embedder, os.path.join(write_dir, "embedder.keras"))
    if not role.is_chief:
        return history
    last = history["epochs"].get(str(config.epochs))
    history["final"] = {k: last[k] for k in history["initial"]} if last else evaluate()
    write_json_atomic(metrics_path, history)
    print(format_metrics_table({"initial": history["initial"], "final": history["final"]}))
    print(f"embedder: {os.path.join(out, 'embedder.keras')}\n"
          f"metrics:  {metrics_path}\n"
          f"logs:     {os.path.join(out, 'logs')} (tensorboard --logdir {os.path.join(out, 'logs')})",
          flush=True)
    return history


def _normalization_state(config: TrainConfig) -> str:
    """What trains in the backbone, for the run header: a CNN's BatchNorm statistics are
    frozen or trained; a ViT (token features) has LayerNorm only, so BatchNorm is not
    named for it."""
    if config.freeze_backbone:
        return "backbone frozen"
    if backbone_spec(config.backbone).features == "tokens":
        return "LayerNorm, all layers trained"
    return f"BatchNorm {'frozen' if config.freeze_batchnorm else 'trained'}"


def describe_run(config: TrainConfig, method, splits, strategy, role, steps: int,
                 resume_from=None) -> str:
    """The run's first lines: data, model, method, strategy, schedule, output."""
    train, test = splits.train, splits.test
    kind = config.data_kind or splits.kind
    precision = "float32"
    if config.mixed_precision:
        precision = "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
    warmup = ""
    if config.warmup_epochs:
        warmup = f", warm-up {config.warmup_epochs} epoch(s) (backbone frozen)"
    lines = [
        f"data:     {config.dataset} ({kind}): train {train.num_images} images of "
        f"{train.num_classes} classes, test {test.num_images} images of {test.num_classes} classes"
        + (f" ({config.eval_dataset})" if config.eval_dataset else ""),
        f"model:    {config.backbone} (weights {config.weights}, {config.image_size} px, "
        f"{_normalization_state(config)}) -> {config.embedding_dim}-d embedding",
        f"method:   {method.name}: {method.description}",
        f"strategy: {describe_strategy(strategy, role)}; {precision}, XLA {config.jit_compile}",
        f"schedule: {config.epochs} epoch{'s' * (config.epochs != 1)} x {steps} steps of "
        f"{config.classes_per_batch} classes x {config.images_per_class} images"
        f"{f' x {config.views} views' if config.views and config.views > 1 else ''}, "
        f"lr {config.lr:g}{warmup}",
        f"output:   {config.output_dir}" + (f" (resuming {resume_from})" if resume_from else ""),
    ]
    if config.freeze_backbone:
        lines.insert(2, f"frozen:   backbone frozen (--freeze_backbone): its features are computed "
                        f"once per image and cached in {os.path.join(config.output_dir, FEATURES_DIR)}; "
                        "only the head and the method's weights train; augmentation off")
    return "\n".join(lines)
