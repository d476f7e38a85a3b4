"""Callbacks of a kdml training run: warm-up, throughput, retrieval evaluation, NaN guard."""

from __future__ import annotations

import math
import time
from typing import Callable, Dict, Optional

import keras
from absl import logging


def grouped_optimizer(optimizer):
    """The `GroupedAdamW` inside `optimizer`.

    Under the `mixed_float16` policy `Model.compile` wraps the optimizer in a
    `keras.optimizers.LossScaleOptimizer`, which applies the unscaled gradients
    through its `inner_optimizer`: that is where the lr multipliers live.
    """
    return getattr(optimizer, "inner_optimizer", optimizer)


class BackboneWarmup(keras.callbacks.Callback):
    """Trains only the head and proxies for the first `epochs` epochs (Kim et al.
    2020's `--warm`), with the backbone frozen as a whole.

    During warm-up the backbone layer is not trainable: it gets no gradients, its
    BatchNorm layers run in inference mode (moving statistics unchanged), and the
    optimizer group `group` (the backbone's variables) has learning-rate multiplier
    0, so `GroupedAdamW` leaves its Adam moments and step count as they are. After
    warm-up every layer gets its own `trainable` flag back (BatchNorm frozen by
    `freeze_batchnorm` stays frozen) and the multiplier returns to 1. Each switch
    retraces the train step (`make_train_function(force=True)`).

    Args:
        epochs: warm-up epochs (0: none).
        group: the backbone's `GroupedAdamW` group pattern.
        backbone: the backbone layer (`embedder.get_layer("backbone")`).
    """

    def __init__(self, epochs: int, group: str, backbone: keras.layers.Layer):
        super().__init__()
        self.epochs = int(epochs)
        self.group = group
        self.backbone = backbone
        self._trainable = None  # the layers' own flags while frozen, else None

    def on_epoch_begin(self, epoch, logs=None):
        frozen = epoch < self.epochs
        grouped_optimizer(self.model.optimizer).set_multiplier(self.group, 0.0 if frozen else 1.0)
        if frozen == (self._trainable is not None):
            return
        if frozen:
            self._freeze()
        else:
            self._unfreeze()
        self.model.make_train_function(force=True)

    def on_train_end(self, logs=None):
        # The saved embedder gets its own flags back; a next `fit` re-freezes if needed.
        if self._trainable is not None:
            self._unfreeze()
            self.model.make_train_function(force=True)

    def _freeze(self):
        self._trainable = [(layer, layer.trainable)
                           for layer in self.backbone._flatten_layers(include_self=True)]
        self.backbone.trainable = False

    def _unfreeze(self):
        if self._trainable is None:
            return
        # Outer layers first: setting a model trainable sets all its layers, then
        # the inner ones get their own flag back.
        for layer, trainable in self._trainable:
            layer.trainable = trainable
        self._trainable = None


class Throughput(keras.callbacks.Callback):
    """Adds `images_per_second` to the epoch logs: steady state, first batch excluded."""

    def __init__(self, batch_size: int):
        super().__init__()
        self.batch_size = batch_size

    def on_epoch_begin(self, epoch, logs=None):
        self._start, self._steps = None, 0

    def on_train_batch_end(self, batch, logs=None):
        if self._start is None:
            self._start = time.perf_counter()
        else:
            self._steps += 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and self._steps:
            logs["images_per_second"] = self._steps * self.batch_size / (
                time.perf_counter() - self._start)


class RetrievalEvaluation(keras.callbacks.Callback):
    """Evaluates retrieval on the test classes every `every` epochs and at the end.

    `evaluate()` returns a metrics dict (`kdml.evaluation.retrieval_metrics`). The
    results are added to the epoch logs (so TensorBoard, placed after this
    callback, records them) and passed to `on_result(epoch, metrics)`; epochs
    without an evaluation pass their logs alone to `on_result`.
    """

    def __init__(self, evaluate: Callable[[], Dict[str, float]], every: int, last_epoch: int,
                 on_result: Optional[Callable[[int, dict], None]] = None):
        super().__init__()
        self.evaluate = evaluate
        self.every = max(1, int(every))
        self.last_epoch = last_epoch
        self.on_result = on_result

    def on_epoch_end(self, epoch, logs=None):
        done = epoch + 1
        if done % self.every and done != self.last_epoch:
            if self.on_result is not None:  # the epoch's logs (loss, diagnostics) alone
                self.on_result(epoch, dict(logs or {}))
            return
        metrics = self.evaluate()
        logging.info("epoch %d: %s", done, ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
        if logs is not None:
            logs.update({f"test_{k}": v for k, v in metrics.items()})
        if self.on_result is not None:
            self.on_result(epoch, {**(logs or {}), **metrics})


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or Inf; the message names the step and the batch."""


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops the run with `NonFiniteLossError` at the first non-finite loss.

    Place it first in the callback list: the error is raised in
    `on_train_batch_end` before any later callback (the checkpointer) runs, so no
    checkpoint is ever written from the diverged state and the newest one on disk
    stays the last good one. Keras' `TerminateOnNaN` only sets `stop_training`,
    after which the epoch-end callbacks still run (and would checkpoint NaNs).

    Args:
        describe_batch: global step -> text naming that step's batch (its classes);
            kdml's batches are a pure function of the step, so the batch can be
            named without keeping it.
        last_checkpoint: () -> path of the newest checkpoint, named in the error.
    """

    def __init__(self, describe_batch: Callable[[int], str],
                 last_checkpoint: Callable[[], Optional[str]] = lambda: None):
        super().__init__()
        self.describe_batch = describe_batch
        self.last_checkpoint = last_checkpoint
        self.step = 0  # global steps done before the current `fit`; set by the runner
        self.epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        step = self.step  # the global step this batch trained
        self.step += 1
        loss = (logs or {}).get("loss")
        if loss is None or math.isfinite(float(loss)):
            return
        self.model.stop_training = True
        raise NonFiniteLossError(
            f"The training loss became {float(loss)} at epoch {self.epoch + 1}, global step "
            f"{step} (batch {batch + 1} of this epoch's run), on the batch of "
            f"{self.describe_batch(step)}. No checkpoint was written from this state; the "
            f"last good one is {self.last_checkpoint() or 'none (no checkpoint yet)'}. "
            "Fix: lower --lr (or the loss scale --alpha / --ms_beta), check that batch's "
            "images, then rerun with --resume.")


class EpochLoss(keras.callbacks.Callback):
    """Makes the epoch's logged `loss` the mean over the whole epoch across a resume.

    Keras logs the running mean of the batches of the current `fit`; a run resumed
    mid-epoch would report the interrupted epoch's mean over its last batches only.
    The runner sets `base_sum` / `base_steps` (the loss sum and batch count before
    the checkpoint, saved in its state) for the first epoch it continues; `state()`
    is what the checkpointer saves. Place it before the callbacks that read `loss`.
    """

    def __init__(self):
        super().__init__()
        self.base_sum, self.base_steps = 0.0, 0
        self.sum, self.steps = 0.0, 0

    def state(self) -> dict:
        return {"epoch_loss_sum": self.sum, "epoch_steps": self.steps}

    def on_epoch_begin(self, epoch, logs=None):
        self.sum, self.steps = self.base_sum, self.base_steps

    def on_train_batch_end(self, batch, logs=None):
        if logs and "loss" in logs:
            self.sum = self.base_sum + float(logs["loss"]) * (batch + 1)
            self.steps = self.base_steps + batch + 1

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "loss" in logs and self.base_steps and self.steps:
            logs["loss"] = self.sum / self.steps
        self.base_sum, self.base_steps = 0.0, 0
